//! `kiln serve` end to end over loopback HTTP: OpenAI shapes and SSE framing, results equal to
//! `kiln gpt2 generate`, 32 concurrent clients each getting exactly their alone result, a
//! client hanging up freeing its slot, every bad input's status while a long stream flows
//! undisturbed, a panic answered 500, graceful shutdown; and the official `openai` Python client
//! when `KILN_TEST_PYTHON` names a Python that has it.
mod serve_common;

use serde_json::{json, Value};
use serve_common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn completion_text(v: &Value, i: usize) -> String {
    v["choices"][i]["text"].as_str().unwrap().to_string()
}

#[test]
fn completions_and_chat_equal_cli_generate() {
    let model = fixture();
    let srv = Server::start(&model, &["--threads", "2"]);
    // Greedy: the same text as `kiln gpt2 generate --greedy`, streamed or not.
    for prompt in [
        "What is the capital of France?",
        "Hello",
        "Once upon a time there",
    ] {
        let (cli, _) = cli_generate(&model, prompt, &["--greedy", "--max-new-tokens", "12"]);
        let r = srv.post(
            "/v1/completions",
            &json!({"model": "gpt2", "prompt": prompt, "max_tokens": 12, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(completion_text(&v, 0), cli, "{prompt}");
        let usage = &v["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );
        let mut s = srv.open_stream(
            "/v1/completions",
            &json!({"model": "gpt2", "prompt": prompt, "max_tokens": 12, "temperature": 0,
                    "stream": true, "stream_options": {"include_usage": true}}),
            &[],
        );
        assert_eq!(s.status, 200);
        assert!(s
            .headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream")));
        let events = s.collect();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let (text, finish) = stream_text(&events, 0);
        assert_eq!(text, cli);
        assert!(finish.is_some());
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(
            usage["usage"]["completion_tokens"],
            v["usage"]["completion_tokens"]
        );
    }
    // Sampling with a seed: the same tokens as the command line with that seed; choice c of
    // n samples with seed + c.
    let prompt = "The meaning of life is";
    let (cli7, _) = cli_generate(
        &model,
        prompt,
        &[
            "--temperature",
            "0.8",
            "--top-k",
            "40",
            "--top-p",
            "0.95",
            "--seed",
            "7",
            "--max-new-tokens",
            "10",
        ],
    );
    let (cli8, _) = cli_generate(
        &model,
        prompt,
        &[
            "--temperature",
            "0.8",
            "--top-k",
            "40",
            "--top-p",
            "0.95",
            "--seed",
            "8",
            "--max-new-tokens",
            "10",
        ],
    );
    let v = srv
        .post(
            "/v1/completions",
            &json!({"model": "gpt2", "prompt": prompt, "max_tokens": 10, "temperature": 0.8,
                    "top_k": 40, "top_p": 0.95, "seed": 7, "n": 2}),
        )
        .json();
    assert_eq!(completion_text(&v, 0), cli7);
    assert_eq!(completion_text(&v, 1), cli8);
    // A list of prompts: one choice per prompt, in order.
    let v = srv
        .post(
            "/v1/completions",
            &json!({"model": "gpt2", "prompt": ["Hello", "What is the capital of France?"],
                    "max_tokens": 12, "temperature": 0}),
        )
        .json();
    assert_eq!(
        completion_text(&v, 0),
        cli_generate(&model, "Hello", &["--greedy", "--max-new-tokens", "12"]).0
    );
    // Echo and log-probabilities.
    let v = srv
        .post(
            "/v1/completions",
            &json!({"model": "gpt2", "prompt": "Hello world", "max_tokens": 4, "temperature": 0,
                    "logprobs": 3, "echo": true}),
        )
        .json();
    let text = completion_text(&v, 0);
    assert!(text.starts_with("Hello world"), "{text}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2 + 4);
    assert!(lp["token_logprobs"][0].is_null());
    for (i, l) in lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .skip(1)
    {
        assert!(l.as_f64().unwrap() <= 0.0);
        assert_eq!(lp["top_logprobs"][i].as_object().unwrap().len(), 3);
    }
    // Greedy: the chosen token is the most likely one.
    let last = lp["top_logprobs"][5].as_object().unwrap();
    let best = last
        .values()
        .map(|x| x.as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    assert!((lp["token_logprobs"][5].as_f64().unwrap() - best).abs() < 1e-5);
    // A stop string ends the text before it.
    let (full, _) = cli_generate(&model, "Hello", &["--greedy", "--max-new-tokens", "12"]);
    let stop: String = full.chars().skip(6).take(3).collect();
    let v = srv
        .post(
            "/v1/completions",
            &json!({"model": "gpt2", "prompt": "Hello", "max_tokens": 12, "temperature": 0,
                    "stop": [stop]}),
        )
        .json();
    let cut = &full[..full.find(&stop).unwrap()];
    assert_eq!(completion_text(&v, 0), cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Chat: the template's prompt, generated as the command line does.
    let rendered = "System: Be brief.\nUser: Hi there\nAssistant:";
    let (cli_chat, _) = cli_generate(&model, rendered, &["--greedy", "--max-new-tokens", "8"]);
    let msgs = json!([{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi there"}]);
    let v = srv
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt2", "messages": msgs, "max_tokens": 8, "temperature": 0,
                    "logprobs": true, "top_logprobs": 2}),
        )
        .json();
    assert_eq!(v["object"], "chat.completion");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(cli_chat.starts_with(content), "{content:?} vs {cli_chat:?}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let lpc = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!lpc.is_empty() && lpc[0]["top_logprobs"].as_array().unwrap().len() == 2);
    let mut s = srv.open_stream(
        "/v1/chat/completions",
        &json!({"model": "gpt2", "messages": msgs, "max_tokens": 8, "temperature": 0, "stream": true}),
        &[],
    );
    let events = s.collect();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(stream_text(&events, 0).0, content);
    // Models, health, metrics.
    let m = srv.request("GET", "/v1/models", "", &[]).json();
    assert_eq!(m["data"][0]["id"], "gpt2");
    assert_eq!(srv.request("GET", "/health", "", &[]).status, 200);
    let metrics = srv.request("GET", "/metrics", "", &[]).text();
    for name in [
        "kiln_requests_total",
        "kiln_prompt_tokens_total",
        "kiln_generation_tokens_total",
        "kiln_queue_length",
        "kiln_batch_size_bucket",
        "kiln_time_to_first_token_seconds_bucket",
        "kiln_inter_token_latency_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

/// A request of the concurrency test: its body and whether it streams.
fn mixed_request(i: usize) -> Value {
    let prompts = [
        "What is the capital of France?",
        "Hello",
        "Once upon a time there was a small village in the mountains where",
        "1, 2, 3,",
        "The quick brown fox",
        "In a shocking finding, scientists discovered a herd of unicorns living in a remote valley",
    ];
    let mut body = json!({
        "model": "gpt2",
        "prompt": prompts[i % prompts.len()],
        "max_tokens": 4 + (i * 7) % 37,
        "stream": i.is_multiple_of(3),
    });
    match i % 4 {
        0 => body["temperature"] = json!(0),
        1 => {
            body["temperature"] = json!(0.7 + 0.1 * (i % 5) as f64);
            body["seed"] = json!(i);
        }
        2 => {
            body["temperature"] = json!(1.0);
            body["top_k"] = json!(5 + i);
            body["seed"] = json!(1000 + i);
        }
        _ => {
            body["top_p"] = json!(0.9);
            body["seed"] = json!(i * 31);
            body["stop"] = json!(["\n"]);
        }
    }
    body
}

fn run_mixed(srv: &Server, body: &Value) -> (String, String) {
    if body["stream"] == json!(true) {
        let mut s = srv.open_stream("/v1/completions", body, &[]);
        assert_eq!(s.status, 200);
        let events = s.collect();
        let (t, f) = stream_text(&events, 0);
        (t, f.unwrap_or_default())
    } else {
        let r = srv.post("/v1/completions", body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        (
            completion_text(&v, 0),
            v["choices"][0]["finish_reason"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    }
}

#[test]
fn thirty_two_concurrent_clients_get_their_alone_results() {
    let srv = Server::start(&fixture(), &["--threads", "2", "--max-batch", "16"]);
    let bodies: Vec<Value> = (0..32).map(mixed_request).collect();
    // Alone: one request at a time (every decode step has one sequence).
    let alone: Vec<(String, String)> = bodies.iter().map(|b| run_mixed(&srv, b)).collect();
    let steps_before = srv.metric("kiln_batch_size_count");
    // Together: 32 clients at once, decoded in shared steps of up to 16 sequences.
    let barrier = std::sync::Barrier::new(bodies.len());
    let together: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| {
                let (srv, barrier) = (&srv, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    run_mixed(srv, b)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i}: {}", bodies[i]);
    }
    // The concurrent run did share steps: fewer steps than tokens.
    let steps = srv.metric("kiln_batch_size_count") - steps_before;
    let one = srv.request("GET", "/metrics", "", &[]).text();
    let sum_line = one
        .lines()
        .find(|l| l.starts_with("kiln_batch_size_sum"))
        .unwrap()
        .to_string();
    assert!(steps > 0.0, "{sum_line}");
    let max_bucket_1: f64 = one
        .lines()
        .find(|l| l.starts_with("kiln_batch_size_bucket{le=\"1\"}"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        max_bucket_1 < srv.metric("kiln_batch_size_count"),
        "no step decoded more than one sequence"
    );
}

#[test]
fn a_client_that_hangs_up_frees_its_slot() {
    let srv = Server::start(
        &long_context_model(),
        &["--threads", "2", "--max-batch", "1"],
    );
    let mut s = srv.open_stream(
        "/v1/completions",
        &json!({"model": "gpt2", "prompt": "Hello", "max_tokens": 1000, "temperature": 0,
                "stream": true}),
        &[],
    );
    for _ in 0..3 {
        s.next_event().unwrap();
    }
    drop(s);
    // The only slot is free again: a new request is answered at once.
    let t0 = Instant::now();
    let r = srv.post(
        "/v1/completions",
        &json!({"model": "gpt2", "prompt": "Hi", "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(r.status, 200);
    let generated = srv.metric("kiln_generation_tokens_total");
    assert!(
        generated < 900.0,
        "the abandoned stream ran on ({generated} tokens, {:?})",
        t0.elapsed()
    );
    // The gauge is updated after the step that finished the request.
    let t1 = Instant::now();
    while srv.metric("kiln_running_sequences") != 0.0 && t1.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(srv.metric("kiln_running_sequences"), 0.0);
}

#[test]
fn bad_inputs_get_their_status_while_a_long_stream_flows() {
    let model = long_context_model();
    let key = "sk-test";
    let mut srv = Server::start_env(
        &model,
        &[
            "--threads",
            "2",
            "--max-batch",
            "2",
            "--max-queue",
            "2",
            "--api-key",
            key,
            "--timeout-secs",
            "1",
            "--max-body-bytes",
            "65536",
        ],
        &[("KILN_SERVE_FAULT_PROMPT", "boom")],
    );
    let auth = format!("Bearer {key}");
    let h = [("Authorization", auth.as_str())];
    let prompt = "Once upon a time";
    let long = json!({"model": "gpt2", "prompt": prompt, "max_tokens": 600, "temperature": 0,
                      "stream": true});
    let mut main = srv.open_stream("/v1/completions", &long, &h);
    assert_eq!(main.status, 200);
    let mut events = vec![main.next_event().unwrap()];
    let post = |body: &str, headers: &[(&str, &str)]| {
        srv.request("POST", "/v1/completions", body, headers)
    };
    let check = |r: &Response, status: u16, needle: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        let v = r.json();
        let e = &v["error"];
        assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
        assert!(e.get("code").is_some(), "{v}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{needle:?} not in {v}"
        );
    };
    let ok_body = json!({"model": "gpt2", "prompt": "Hi", "max_tokens": 2}).to_string();
    check(&post(&ok_body, &[]), 401, "API key");
    check(
        &post(&ok_body, &[("Authorization", "Bearer nope")]),
        401,
        "API key",
    );
    let huge = json!({"model": "gpt2", "prompt": "x".repeat(100_000)}).to_string();
    check(&post(&huge, &h), 413, "65536");
    check(&post("{\"model\": \"gpt2\", \"prompt\": ", &h), 400, "JSON");
    check(
        &post(
            &json!({"model": "gpt2", "prompt": "Hi", "temperature": "hot"}).to_string(),
            &h,
        ),
        400,
        "temperature",
    );
    check(
        &post(
            &json!({"model": "gpt2", "prompt": "Hi", "max_tokens": -3}).to_string(),
            &h,
        ),
        400,
        "max_tokens",
    );
    check(
        &post(
            &json!({"model": "gpt2", "prompt": "Hi", "top_p": 1.5}).to_string(),
            &h,
        ),
        400,
        "top_p",
    );
    let r = post(
        &json!({"model": "gpt2", "prompt": "word ".repeat(1000), "max_tokens": 100}).to_string(),
        &h,
    );
    check(&r, 400, "1024");
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    assert!(r.text().contains("+ 100 to generate"), "{}", r.text());
    check(
        &post(&json!({"model": "gpt-4", "prompt": "Hi"}).to_string(), &h),
        404,
        "gpt-4",
    );
    check(
        &srv.request("GET", "/v1/nothing", "", &h),
        404,
        "/v1/nothing",
    );
    // A panic in one request's work: 500 for it, nothing for the others.
    check(
        &post(
            &json!({"model": "gpt2", "prompt": "boom", "max_tokens": 3}).to_string(),
            &h,
        ),
        500,
        "internal error",
    );
    // A full queue: the second slot and the two queue places taken, the next request gets 429.
    let side = json!({"model": "gpt2", "prompt": "Side", "max_tokens": 900, "temperature": 0,
                      "stream": true});
    let mut sides = vec![srv.open_stream("/v1/completions", &side, &h)];
    let t0 = Instant::now();
    while srv.metric("kiln_running_sequences") < 2.0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    sides.push(srv.open_stream("/v1/completions", &side, &h));
    sides.push(srv.open_stream("/v1/completions", &side, &h));
    let r = post(&ok_body, &h);
    check(&r, 429, "queue");
    assert_eq!(r.header("retry-after"), Some("1"));
    drop(sides);
    // A client that sends half its headers, and one that sends half its body, are cut.
    let mut slow = TcpStream::connect(&srv.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let t0 = Instant::now();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "slow headers were not cut"
    );
    let mut slow = TcpStream::connect(&srv.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 100\r\n\r\n{{\"model\""
    );
    slow.write_all(head.as_bytes()).unwrap();
    let r = read_response(std::io::BufReader::new(slow));
    assert_eq!(r.status, 408, "{}", r.text());
    // The long stream went on undisturbed: every token, the command line's greedy text.
    events.extend(main.collect());
    let (text, finish) = stream_text(&events, 0);
    let (cli, ids) = cli_generate(&model, prompt, &["--greedy", "--max-new-tokens", "600"]);
    assert_eq!(text, cli);
    if ids.len() == 600 {
        assert_eq!(finish.as_deref(), Some("length"));
    }
    let st = srv
        .terminate(Duration::from_secs(15))
        .expect("the server exits");
    assert!(st.success(), "exit status {st:?}");
}

#[test]
fn shutdown_lets_a_stream_finish_and_exits_0() {
    let mut srv = Server::start(
        &long_context_model(),
        &["--threads", "2", "--shutdown-secs", "30"],
    );
    let mut s = srv.open_stream(
        "/v1/completions",
        &json!({"model": "gpt2", "prompt": "Hello", "max_tokens": 300, "temperature": 0,
                "stream": true}),
        &[],
    );
    let first = s.next_event().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &srv.child.id().to_string()])
        .status();
    let mut events = vec![first];
    events.extend(s.collect());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(stream_text(&events, 0).1.is_some(), "the stream was cut");
    let st = srv
        .terminate(Duration::from_secs(30))
        .expect("the server exits");
    assert!(st.success(), "exit status {st:?}");
    assert!(TcpStream::connect(&srv.addr).is_err(), "still accepting");
}

use std::process::Command;

/// The official `openai` client (PyPI) against the server: set `KILN_TEST_PYTHON` to a Python
/// that has it (`tests/serve/run_openai_client.sh` makes one).
#[test]
fn openai_python_client() {
    let Ok(python) = std::env::var("KILN_TEST_PYTHON") else {
        println!("SKIP openai_python_client: KILN_TEST_PYTHON is not set (a Python with `openai`)");
        return;
    };
    let model = fixture();
    let srv = Server::start(&model, &["--threads", "2", "--api-key", "sk-kiln"]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve/test_openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .env("KILN_URL", format!("http://{}/v1", srv.addr))
        .env("KILN_API_KEY", "sk-kiln")
        .env("KILN_BIN", env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_MODEL", model)
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "stdout:\n{so}\nstderr:\n{se}");
    assert!(so.contains("openai client: all checks passed"), "{so}");
}
