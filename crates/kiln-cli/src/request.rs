//! The checks of a generation request, shared by `kiln gpt2 generate` and `kiln serve`: both
//! refuse the same requests with the same messages, before any output.
//!
//! | field | rule |
//! |---|---|
//! | prompt | at least one token |
//! | `temperature` | a finite number ≥ 0 (0 means greedy) |
//! | `top_p` | in (0, 1] |
//! | `top_k` | an integer ≥ 0 (0 keeps every token) |
//! | `repetition_penalty` | a finite number > 0 |
//! | prompt + `max_tokens` | at most the model's context (`n_positions`) |
use kiln_models::gpt2::SamplerConfig;

/// A refused request: the field at fault (the HTTP API's name) and a message naming the value.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub param: &'static str,
    pub message: String,
    /// `context_length_exceeded` for a request that does not fit the context.
    pub code: Option<&'static str>,
}

impl FieldError {
    pub fn new(param: &'static str, message: impl Into<String>) -> Self {
        FieldError {
            param,
            message: message.into(),
            code: None,
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// On the command line a message that starts with the field names the flag instead
/// (`top_p must be …` → `--top-p must be …`).
impl From<FieldError> for kiln_tensor::Error {
    fn from(e: FieldError) -> Self {
        let msg = match e.message.strip_prefix(e.param) {
            Some(rest) if rest.starts_with(' ') => {
                format!("--{}{rest}", e.param.replace('_', "-"))
            }
            _ => e.message,
        };
        kiln_tensor::Error::invalid(msg)
    }
}

/// Sampling settings as a request gives them (absent fields are `None`).
#[derive(Debug, Clone, Default)]
pub struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f64>,
    pub seed: u64,
    /// Always take the most likely token, whatever the other settings say.
    pub greedy: bool,
}

impl Sampling {
    /// The sampler configuration, or the first field out of range. Greedy when asked, or when
    /// the temperature is 0; `default_greedy` decides when no sampling field is given (the
    /// command line's default is greedy, the API's is sampling at temperature 1).
    pub fn config(&self, default_greedy: bool) -> Result<SamplerConfig, FieldError> {
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t >= 0.0) {
                return Err(FieldError::new(
                    "temperature",
                    format!("temperature must be a finite number ≥ 0, got {t}"),
                ));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(FieldError::new(
                    "top_p",
                    format!("top_p must be in (0, 1], got {p}"),
                ));
            }
        }
        if let Some(k) = self.top_k {
            if k < 0 {
                return Err(FieldError::new(
                    "top_k",
                    format!("top_k must be an integer ≥ 0 (0 keeps every token), got {k}"),
                ));
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                return Err(FieldError::new(
                    "repetition_penalty",
                    format!("repetition_penalty must be a finite number > 0, got {r}"),
                ));
            }
        }
        let sampling = self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some();
        Ok(SamplerConfig {
            greedy: self.greedy || (default_greedy && !sampling),
            temperature: self.temperature.unwrap_or(1.0) as f32,
            top_k: self.top_k.unwrap_or(0) as usize,
            top_p: self.top_p.unwrap_or(1.0) as f32,
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0) as f32,
            seed: self.seed,
        })
    }
}

/// Checks that a prompt of `prompt_tokens` plus `max_tokens` new ones fits a context of
/// `n_positions`, with a message that gives the numbers.
pub fn check_context(
    prompt_tokens: usize,
    max_tokens: usize,
    n_positions: usize,
) -> Result<(), FieldError> {
    if prompt_tokens == 0 {
        return Err(FieldError::new("prompt", "the prompt is empty"));
    }
    let total = prompt_tokens.saturating_add(max_tokens);
    if total > n_positions {
        return Err(FieldError {
            param: "max_tokens",
            message: format!(
                "this model's context of {n_positions} tokens is exceeded: {total} were \
                 requested ({prompt_tokens} in the prompt + {max_tokens} to generate); shorten \
                 the prompt or ask for fewer tokens"
            ),
            code: Some("context_length_exceeded"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_name_the_field() {
        let bad = |s: Sampling| s.config(true).unwrap_err().param;
        assert_eq!(
            bad(Sampling {
                temperature: Some(-1.0),
                ..Default::default()
            }),
            "temperature"
        );
        assert_eq!(
            bad(Sampling {
                top_p: Some(0.0),
                ..Default::default()
            }),
            "top_p"
        );
        assert_eq!(
            bad(Sampling {
                top_k: Some(-2),
                ..Default::default()
            }),
            "top_k"
        );
        assert!(Sampling::default().config(true).unwrap().greedy);
        assert!(!Sampling::default().config(false).unwrap().greedy);
    }

    #[test]
    fn context_check_gives_the_numbers() {
        assert!(check_context(10, 20, 30).is_ok());
        let e = check_context(25, 10, 30).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(e.message.contains("30") && e.message.contains("35"));
        assert!(e.message.contains("25") && e.message.contains("10"));
        assert_eq!(check_context(0, 1, 30).unwrap_err().param, "prompt");
    }
}
