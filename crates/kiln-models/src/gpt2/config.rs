//! `config.json` of a GPT-2 checkpoint folder, as the Hub writes it.
use kiln_tensor::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The hyper-parameters GPT-2 needs. Unknown fields of `config.json` are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Number of transformer blocks `L`.
    pub n_layer: usize,
    /// Attention heads `H`; the head width is `D = C / H`.
    pub n_head: usize,
    /// Model width `C`.
    pub n_embd: usize,
    /// Longest sequence the position table covers (1024 for GPT-2).
    pub n_positions: usize,
    /// Vocabulary size `V` (50257 for GPT-2).
    pub vocab_size: usize,
    /// The epsilon of every layer norm.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f32,
    /// Width of the MLP's hidden layer; `null`/absent means `4·C`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// Must be a tanh-approximated GELU (`gelu_new`, GPT-2's own); absent means that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_function: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
}

fn default_eps() -> f32 {
    1e-5
}

impl Gpt2Config {
    /// The shapes of the released GPT-2 sizes and a tiny one for tests: `124M`, `355M`, `774M`,
    /// `1558M`, `mini` (4 layers, 4 heads, width 128, 256 positions) and `tiny` (2 layers, 4
    /// heads, width 64, 128 positions), both with the full vocabulary.
    pub fn preset(size: &str) -> Result<Self> {
        let (n_layer, n_head, n_embd, n_positions) = match size.to_ascii_uppercase().as_str() {
            "124M" | "SMALL" => (12, 12, 768, 1024),
            "355M" | "MEDIUM" => (24, 16, 1024, 1024),
            "774M" | "LARGE" => (36, 20, 1280, 1024),
            "1558M" | "XL" => (48, 25, 1600, 1024),
            "MINI" => (4, 4, 128, 256),
            "TINY" => (2, 4, 64, 128),
            _ => {
                return Err(Error::invalid(format!(
                    "unknown GPT-2 size `{size}` (expected 124M, 355M, 774M, 1558M, mini or tiny)"
                )))
            }
        };
        Ok(Gpt2Config {
            n_layer,
            n_head,
            n_embd,
            n_positions,
            vocab_size: 50257,
            layer_norm_epsilon: 1e-5,
            n_inner: None,
            activation_function: Some("gelu_new".into()),
            model_type: Some("gpt2".into()),
        })
    }

    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses and validates config JSON; `path` names it in errors.
    pub fn from_json(json: &[u8], path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let cfg: Gpt2Config = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
        cfg.validate().map_err(|e| bad(e.to_string()))?;
        Ok(cfg)
    }

    /// Checks that the numbers describe a model kiln can run.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("n_positions", self.n_positions),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(Error::invalid(format!("`{name}` must be positive")));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::invalid(format!(
                "`n_embd` ({}) is not a multiple of `n_head` ({})",
                self.n_embd, self.n_head
            )));
        }
        if self.n_inner == Some(0) {
            return Err(Error::invalid("`n_inner` must be positive"));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon >= 0.0) {
            return Err(Error::invalid(format!(
                "`layer_norm_epsilon` ({}) must be finite and non-negative",
                self.layer_norm_epsilon
            )));
        }
        if let Some(act) = &self.activation_function {
            if !matches!(act.as_str(), "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") {
                return Err(Error::invalid(format!(
                    "`activation_function` `{act}` is not supported (GPT-2 uses the tanh GELU, `gelu_new`)"
                )));
            }
        }
        // Sizes whose tensors would not fit in memory are refused before anything is allocated.
        let c = self.n_embd as u128;
        let params = self.vocab_size as u128 * c
            + self.n_positions as u128 * c
            + self.n_layer as u128 * (12 * c * c);
        if params > (1u128 << 40) {
            return Err(Error::invalid(format!(
                "the config describes {params} parameters, too many"
            )));
        }
        Ok(())
    }

    /// Head width `D = C / H`.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// MLP hidden width (`n_inner`, or `4·C`).
    pub fn mlp_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Number of parameters (wte tied with lm_head, so counted once).
    pub fn num_params(&self) -> usize {
        let (c, f) = (self.n_embd, self.mlp_dim());
        let block = 2 * 2 * c // ln_1, ln_2
            + c * 3 * c + 3 * c // c_attn
            + c * c + c // attn.c_proj
            + c * f + f // c_fc
            + f * c + c; // mlp.c_proj
        self.vocab_size * c + self.n_positions * c + self.n_layer * block + 2 * c
    }

    /// The config as `config.json` text (the fields transformers needs to load it).
    pub fn to_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("a config always serialises");
        let obj = v.as_object_mut().expect("an object");
        obj.insert(
            "architectures".into(),
            serde_json::json!(["GPT2LMHeadModel"]),
        );
        obj.insert("bos_token_id".into(), serde_json::json!(50256));
        obj.insert("eos_token_id".into(), serde_json::json!(50256));
        obj.insert("initializer_range".into(), serde_json::json!(0.02));
        obj.insert("n_ctx".into(), serde_json::json!(self.n_positions));
        obj.insert("tie_word_embeddings".into(), serde_json::json!(true));
        // The f32 epsilon as its shortest decimal (1e-5, not the 9.999999747378752e-6
        // that widening it to f64 gives).
        let eps: f64 = self.layer_norm_epsilon.to_string().parse().unwrap_or(1e-5);
        obj.insert("layer_norm_epsilon".into(), serde_json::json!(eps));
        let mut s = serde_json::to_string_pretty(&v).expect("a value always serialises");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epsilon_is_written_as_its_shortest_decimal() {
        let json = Gpt2Config::preset("tiny").unwrap().to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["layer_norm_epsilon"].as_f64(), Some(1e-5), "{json}");
    }

    #[test]
    fn presets_have_the_released_parameter_counts() {
        let p = |s| Gpt2Config::preset(s).unwrap().num_params();
        assert_eq!(p("124M"), 124_439_808);
        assert_eq!(p("355M"), 354_823_168);
        assert_eq!(p("774M"), 774_030_080);
        assert_eq!(p("1558M"), 1_557_611_200);
    }

    #[test]
    fn bad_configs_are_refused() {
        let path = Path::new("config.json");
        let ok = br#"{"n_layer":2,"n_head":4,"n_embd":64,"n_positions":128,"vocab_size":50257,"extra":1}"#;
        assert!(Gpt2Config::from_json(ok, path).is_ok());
        for bad in [
            &br#"{"n_layer":2,"n_head":3,"n_embd":64,"n_positions":128,"vocab_size":50257}"#[..],
            br#"{"n_layer":0,"n_head":4,"n_embd":64,"n_positions":128,"vocab_size":50257}"#,
            br#"{"n_head":4,"n_embd":64,"n_positions":128,"vocab_size":50257}"#,
            br#"{"n_layer":"two","n_head":4,"n_embd":64,"n_positions":128,"vocab_size":50257}"#,
            br#"not json"#,
        ] {
            let e = Gpt2Config::from_json(bad, path).unwrap_err().to_string();
            assert!(e.starts_with("config.json: bad config:"), "{e}");
        }
    }
}
