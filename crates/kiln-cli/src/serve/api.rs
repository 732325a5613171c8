//! Request bodies of the OpenAI API as kiln reads them, and its error shape.
//!
//! Fields are read from the JSON by hand so that a wrong type gets a 400 naming the field;
//! fields kiln does not use (`user`, `suffix`, …) are ignored, as OpenAI-compatible servers do.
use crate::request::{check_context, FieldError, Sampling};
use axum::http::StatusCode;
use serde_json::{json, Map, Value};

/// An error answer: `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A 400 about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        let mut a = ApiError::invalid(e.param, e.message);
        a.code = e.code;
        a
    }
}

/// Reads typed fields of a request object; a present field of the wrong type is a 400 naming it
/// (`null` counts as absent).
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }
    fn wrong(name: &str, what: &str, v: &Value) -> ApiError {
        ApiError::invalid(
            name,
            format!("field `{name}` must be {what}, got {}", type_name(v)),
        )
    }
    pub fn f64(&self, name: &str) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Self::wrong(name, "a number", v)),
        }
    }
    pub fn i64(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| Self::wrong(name, "an integer", v)),
        }
    }
    /// An integer in `lo ..= hi`.
    pub fn int_in(&self, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        let v = self.i64(name)?;
        if let Some(x) = v {
            if x < lo || x > hi {
                return Err(ApiError::invalid(
                    name,
                    format!("field `{name}` must be between {lo} and {hi}, got {x}"),
                ));
            }
        }
        Ok(v)
    }
    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Self::wrong(name, "a boolean", v)),
        }
    }
    pub fn str(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| Self::wrong(name, "a string", v)),
        }
    }
    /// A string or a list of strings (`stop`).
    pub fn strings(&self, name: &str) -> Result<Vec<String>, ApiError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| Self::wrong(name, "a string or a list of strings", v))
                })
                .collect(),
            Some(v) => Err(Self::wrong(name, "a string or a list of strings", v)),
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses a body as a JSON object.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the body must be a JSON object, got {}", type_name(&other)),
        )),
    }
}

/// The settings common to both endpoints, checked.
#[derive(Debug, Clone)]
pub struct Common {
    pub model: String,
    pub sampling: Sampling,
    pub seed: Option<u64>,
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Reads `model`, the sampling fields, `n`, `stop`, `seed`, `stream`, `stream_options`; a
/// `model` other than `served` is a 404.
pub fn common(f: &Fields<'_>, served: &str) -> Result<Common, ApiError> {
    let model = f
        .str("model")?
        .ok_or_else(|| ApiError::invalid("model", "field `model` is required"))?
        .to_string();
    if model != served {
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("the model `{model}` does not exist (this server serves `{served}`)"),
            )
        }
        .with_code("model_not_found"));
    }
    let seed = f.i64("seed")?.map(|s| s as u64);
    let sampling = Sampling {
        temperature: f.f64("temperature")?,
        top_p: f.f64("top_p")?,
        top_k: f.i64("top_k")?,
        repetition_penalty: f.f64("repetition_penalty")?,
        seed: 0,
        greedy: false,
    };
    // Checked here so that the error comes before anything is queued.
    sampling.config(false)?;
    let n = f.int_in("n", 1, 128)?.unwrap_or(1) as usize;
    let stop = f.strings("stop")?;
    if stop.len() > 16 || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "field `stop` takes at most 16 non-empty strings",
        ));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage")?.unwrap_or(false),
        Some(v) => return Err(Fields::wrong("stream_options", "an object", v)),
    };
    Ok(Common {
        model,
        sampling,
        seed,
        n,
        stop,
        stream,
        include_usage,
    })
}

/// A prompt as `POST /v1/completions` gives it: text, or token ids.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of lists of ids.
pub fn prompts(f: &Fields<'_>) -> Result<Vec<Prompt>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "field `prompt` must be a string, a list of strings, or token ids",
        )
    };
    let ids = |a: &Vec<Value>| -> Option<Vec<u32>> {
        a.iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .map(|x| x as u32)
            })
            .collect()
    };
    let v = f
        .get("prompt")
        .ok_or_else(|| ApiError::invalid("prompt", "field `prompt` is required"))?;
    let out = match v {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| Prompt::Text(s.as_str().unwrap_or_default().to_string()))
            .collect(),
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => {
            vec![Prompt::Ids(ids(a).ok_or_else(bad)?)]
        }
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_array) => a
            .iter()
            .map(|x| match x {
                Value::Array(inner) => ids(inner).map(Prompt::Ids).ok_or_else(bad),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    Ok(out)
}

/// The chat template: GPT-2 has no chat format, so each message is a line `Role: content` (the
/// role capitalised: `System`, `User`, `Assistant`, …), and the prompt ends with
/// `Assistant:` for the model to continue.
pub const CHAT_STOP: &str = "\nUser:";

/// `messages` rendered by the chat template.
pub fn chat_prompt(f: &Fields<'_>) -> Result<String, ApiError> {
    let bad = |msg: String| ApiError::invalid("messages", msg);
    let msgs = match f.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(bad("field `messages` is empty".into())),
        Some(v) => return Err(Fields::wrong("messages", "a list of messages", v)),
        None => return Err(bad("field `messages` is required".into())),
    };
    let mut out = String::new();
    for (i, m) in msgs.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(bad(format!("messages[{i}] must be an object")));
        };
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("messages[{i}].role must be a string")))?;
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match p.get("text").and_then(Value::as_str) {
                        Some(t) => s.push_str(t),
                        None => {
                            return Err(bad(format!(
                                "messages[{i}].content: only text parts are supported"
                            )))
                        }
                    }
                }
                s
            }
            Some(_) => {
                return Err(bad(format!(
                    "messages[{i}].content must be a string or a list of text parts"
                )))
            }
        };
        let mut r = role.chars();
        let role: String = match r.next() {
            Some(c) => c.to_uppercase().chain(r).collect(),
            None => return Err(bad(format!("messages[{i}].role is empty"))),
        };
        out.push_str(&role);
        out.push_str(": ");
        out.push_str(&content);
        out.push('\n');
    }
    out.push_str("Assistant:");
    Ok(out)
}

/// `max_tokens` (or `max_completion_tokens`), defaulting to `default`; checked against the
/// context with the prompt.
pub fn max_tokens(
    f: &Fields<'_>,
    names: &[&str],
    default: Option<usize>,
    prompt_tokens: usize,
    n_positions: usize,
) -> Result<usize, ApiError> {
    let mut v = None;
    for name in names {
        if let Some(x) = f.int_in(name, 0, i64::MAX)? {
            v = Some(x as usize);
            break;
        }
    }
    let max = v.unwrap_or_else(|| default.unwrap_or(n_positions.saturating_sub(prompt_tokens)));
    check_context(prompt_tokens, max, n_positions)?;
    Ok(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_template() {
        let body = json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ]});
        let m = body.as_object().unwrap();
        assert_eq!(
            chat_prompt(&Fields(m)).unwrap(),
            "System: Be brief.\nUser: Hi\nAssistant:"
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        let body = json!({"model": "gpt2", "temperature": "hot"});
        let e = common(&Fields(body.as_object().unwrap()), "gpt2").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(e.message.contains("a number"), "{}", e.message);
        let body = json!({"model": "gpt-4"});
        let e = common(&Fields(body.as_object().unwrap()), "gpt2").unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
    }
}
