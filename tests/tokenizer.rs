//! GPT-2 tokenizer against the Python `tokenizers` library (fixtures from
//! `tests/fixtures/make_tokenizer_fixtures.py`), plus round trips, bad files and thread safety.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_models::tokenizer::{pretokenize, Gpt2Tokenizer, GPT2_MERGES_TXT, GPT2_VOCAB_JSON};
use proptest::prelude::*;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tok() -> &'static Gpt2Tokenizer {
    static TOK: OnceLock<Gpt2Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Gpt2Tokenizer::gpt2_default().expect("embedded GPT-2 tokenizer"))
}

fn cases() -> &'static Value {
    static CASES: OnceLock<Value> = OnceLock::new();
    CASES.get_or_init(|| {
        let path = root().join("tests/fixtures/tokenizer/cases.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("cases.json")
    })
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn encode_cases() -> Vec<(String, String, Vec<u32>, Vec<u32>)> {
    cases()["encode"]
        .as_array()
        .expect("encode cases")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["text"].as_str().unwrap().to_string(),
                ids_of(&c["ids"]),
                ids_of(&c["ids_special"]),
            )
        })
        .collect()
}

#[test]
fn fixture_covers_the_required_cases() {
    let names: Vec<String> = encode_cases().into_iter().map(|c| c.0).collect();
    for required in [
        "france",
        "english",
        "empty",
        "spaces_before_word",
        "trailing_spaces",
        "newlines",
        "tabs",
        "crlf",
        "contractions",
        "contractions_upper",
        "contractions_curly",
        "numbers",
        "punctuation_runs",
        "emoji",
        "emoji_zwj",
        "chinese",
        "japanese",
        "arabic",
        "combining_marks",
        "paragraph_5kb",
        "endoftext_text",
        "endoftext_space_before",
    ] {
        assert!(
            names.iter().any(|n| n == required),
            "missing fixture case {required}"
        );
    }
    assert!(names.len() >= 400, "{} cases", names.len());
    let para = encode_cases()
        .into_iter()
        .find(|c| c.0 == "paragraph_5kb")
        .unwrap();
    assert!(para.1.len() >= 5000);
}

#[test]
fn encode_equals_reference_on_every_fixture() {
    let t = tok();
    let mut failures = Vec::new();
    for (name, text, ids, _) in encode_cases() {
        let got = t.encode(&text);
        if got != ids {
            failures.push(format!(
                "{name}: text {text:?}\n  expected {ids:?}\n  got      {got:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn encode_with_special_equals_reference_on_every_fixture() {
    let t = tok();
    let mut failures = Vec::new();
    for (name, text, plain, special) in encode_cases() {
        let got = t.encode_with_special(&text, true);
        if got != special {
            failures.push(format!(
                "{name}: text {text:?}\n  expected {special:?}\n  got      {got:?}"
            ));
        }
        assert_eq!(t.encode_with_special(&text, false), plain, "{name}");
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn documented_examples() {
    let t = tok();
    assert_eq!(
        t.encode("What is the capital of France?"),
        [2061, 318, 262, 3139, 286, 4881, 30]
    );
    assert_eq!(t.encode("<|endoftext|>"), [27, 91, 437, 1659, 5239, 91, 29]);
    assert_eq!(t.encode_with_special("<|endoftext|>", true), [50256]);
    assert_eq!(t.encode_with_special(" <|endoftext|>", true), [220, 50256]);
    assert_eq!(t.encode(""), Vec::<u32>::new());
    assert_eq!(t.vocab_size(), 50257);
    assert_eq!(t.eot_id(), 50256);
    assert_eq!(t.token_bytes(50256), Some(&b"<|endoftext|>"[..]));
    assert_eq!(t.token_bytes(220), Some(&b" "[..]));
    assert_eq!(t.token_bytes(50257), None);
}

#[test]
fn decode_round_trips_every_fixture() {
    let t = tok();
    for (name, text, ids, special) in encode_cases() {
        assert_eq!(t.decode(&ids).unwrap(), text, "{name}");
        assert_eq!(t.decode(&special).unwrap(), text, "{name} (special)");
        assert_eq!(t.decode_bytes(&ids).unwrap(), text.as_bytes(), "{name}");
    }
}

#[test]
fn decode_equals_reference_including_split_characters() {
    let t = tok();
    let decode = cases()["decode"].as_array().expect("decode cases");
    assert!(decode.len() >= 100);
    for c in decode {
        let ids = ids_of(&c["ids"]);
        let want = c["text"].as_str().unwrap();
        assert_eq!(t.decode(&ids).unwrap(), want, "ids {ids:?}");
    }
    // A lone lead byte of a 3-byte character, then a full character.
    let lead = t.encode("我")[0];
    assert_eq!(t.decode(&[lead]).unwrap(), "\u{FFFD}");
}

#[test]
fn decode_rejects_unknown_ids() {
    let t = tok();
    let err = t.decode(&[15496, 50257]).unwrap_err().to_string();
    assert!(err.contains("50257"), "{err}");
    let err = t.decode_bytes(&[u32::MAX]).unwrap_err().to_string();
    assert!(err.contains(&u32::MAX.to_string()), "{err}");
}

#[test]
fn cache_gives_the_same_ids_cold_and_warm() {
    let t = Gpt2Tokenizer::gpt2_default().unwrap();
    for (name, text, ids, _) in encode_cases().into_iter().take(120) {
        assert_eq!(t.encode(&text), ids, "{name} (cold)");
        assert_eq!(t.encode(&text), ids, "{name} (warm)");
    }
    // Many distinct words: the cache stops growing but results stay right.
    let text: String = (0..80_000).map(|i| format!(" w{i}x")).collect();
    let ids = t.encode(&text);
    assert_eq!(t.decode(&ids).unwrap(), text);
    assert_eq!(t.encode(&text), ids);
}

#[test]
fn shared_across_threads() {
    let t = Gpt2Tokenizer::gpt2_default().unwrap();
    let cases = encode_cases();
    std::thread::scope(|s| {
        for k in 0..2 {
            let (t, cases) = (&t, &cases);
            s.spawn(move || {
                for (name, text, ids, _) in cases.iter().skip(k).step_by(2).chain(cases.iter()) {
                    assert_eq!(&t.encode(text), ids, "{name}");
                }
            });
        }
    });
}

#[test]
fn loads_from_files() {
    let dir = root().join("crates/kiln-models/assets/gpt2");
    let t = Gpt2Tokenizer::from_files(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap();
    assert_eq!(t.encode("Hello world"), tok().encode("Hello world"));
    let err = Gpt2Tokenizer::from_files(
        Path::new("/nonexistent/vocab.json"),
        &dir.join("merges.txt"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/nonexistent/vocab.json"), "{err}");
}

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("kiln-tokenizer-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn bad_files_are_errors() {
    let err = |vocab: &[u8], merges: &[u8]| {
        Gpt2Tokenizer::from_bytes(vocab, merges)
            .unwrap_err()
            .to_string()
    };
    // vocab.json problems
    assert!(err(b"", GPT2_MERGES_TXT).contains("vocab.json"));
    assert!(err(b"[1, 2]", GPT2_MERGES_TXT).contains("vocab.json"));
    assert!(err(b"{}", GPT2_MERGES_TXT).contains("empty"));
    assert!(err(br#"{"a": -1}"#, GPT2_MERGES_TXT).contains("vocab.json"));
    assert!(err(br#"{"a": 99999999999}"#, GPT2_MERGES_TXT).contains("too large"));
    assert!(err(br#"{"a": 0, "b": 0}"#, GPT2_MERGES_TXT).contains("share id 0"));
    assert!(err(br#"{"a": 0, "a": 1}"#, GPT2_MERGES_TXT).contains("twice"));
    assert!(err(br#"{"a": 0}"#, GPT2_MERGES_TXT).contains("no token for byte"));
    // merges.txt problems
    assert!(err(GPT2_VOCAB_JSON, b"#version: 0.2\nab\n").contains("line 2"));
    assert!(err(GPT2_VOCAB_JSON, b"a b c\n").contains("line 1"));
    assert!(err(GPT2_VOCAB_JSON, b"\xff\xfe\n").contains("UTF-8"));
    assert!(err(GPT2_VOCAB_JSON, "Ġ t\nzzzq Ġ\n".as_bytes()).contains("zzzq"));
    // a merge whose result is not a token
    assert!(err(GPT2_VOCAB_JSON, "Ġ t\nĠ Ċ\n".as_bytes()).contains("ĠĊ"));
    // No end-of-text token.
    let vocab: serde_json::Map<String, Value> = serde_json::from_slice(GPT2_VOCAB_JSON).unwrap();
    let mut vocab = vocab;
    vocab.remove("<|endoftext|>");
    let without = serde_json::to_vec(&vocab).unwrap();
    assert!(err(&without, GPT2_MERGES_TXT).contains("<|endoftext|>"));
    // Through files: the error names the file.
    let dir = temp_dir("bad");
    std::fs::write(dir.join("vocab.json"), b"{not json").unwrap();
    std::fs::write(dir.join("merges.txt"), GPT2_MERGES_TXT).unwrap();
    let e = Gpt2Tokenizer::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab.json"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn small_hand_made_vocabulary() {
    // All 256 byte tokens, end-of-text, and two merges; with CRLF line ends in merges.txt.
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        let c = kiln_models::tokenizer::bytes::BYTE_TO_CHAR[b as usize];
        vocab.insert(c.to_string(), Value::from(b as u64));
    }
    vocab.insert("ab".into(), Value::from(256u64));
    vocab.insert("abc".into(), Value::from(257u64));
    vocab.insert("<|endoftext|>".into(), Value::from(300u64));
    let vocab = serde_json::to_vec(&vocab).unwrap();
    let t = Gpt2Tokenizer::from_bytes(&vocab, b"#version: 0.2\r\na b\r\nab c\r\n").unwrap();
    assert_eq!(t.vocab_size(), 301);
    assert_eq!(t.eot_id(), 300);
    assert_eq!(t.encode("abcab"), [257, 256]);
    assert_eq!(t.token_bytes(280), None);
    assert!(t.decode(&[280]).is_err());
    assert_eq!(t.decode(&[257, 300]).unwrap(), "abc<|endoftext|>");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_string_round_trips(s in any::<String>()) {
        let t = tok();
        let ids = t.encode_with_special(&s, true);
        prop_assert_eq!(t.decode(&ids).unwrap(), s.clone());
        prop_assert_eq!(t.decode(&t.encode(&s)).unwrap(), s);
    }

    #[test]
    fn any_ids_decode_without_panic(ids in proptest::collection::vec(0u32..50300, 0..40)) {
        let t = tok();
        let r = t.decode(&ids);
        prop_assert_eq!(r.is_ok(), ids.iter().all(|&id| id < 50257));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn round_trip_and_pieces_cover_the_text(s in "\\PC{0,40}|[ \\t\\n\\r'a-zA-Z0-9.!]{0,40}") {
        let t = tok();
        let ids = t.encode(&s);
        prop_assert_eq!(t.decode(&ids).unwrap(), s.clone());
        let joined: String = pretokenize::pieces(&s).collect();
        prop_assert_eq!(joined, s.clone());
        prop_assert!(pretokenize::pieces(&s).all(|p| !p.is_empty()));
    }
}
