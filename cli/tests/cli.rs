//! The `lacuna` binary as a user runs it: JSON outputs, exit codes and error messages.

mod lineage;

use std::process::{Command, Output};

use lacuna_tests::{fixtures_dir, smollm2_gguf};
use serde_json::Value;

fn lacuna(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lacuna")).args(args).env("LACUNA_THREADS", "2").output().expect("run lacuna")
}

fn ok_json(args: &[&str]) -> Value {
    let out = lacuna(args);
    assert!(out.status.success(), "lacuna {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("lacuna {args:?}: stdout is not JSON ({e})"))
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = lacuna(args);
    assert_eq!(out.status.code(), Some(1), "lacuna {args:?} should fail with exit code 1");
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "lacuna {args:?}: stderr lacks {n:?}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn inspect_reports_every_tensor() {
    let gguf = smollm2_gguf();
    let v = ok_json(&["inspect", gguf.to_str().unwrap(), "--json"]);
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["tensors"].as_array().unwrap().len(), 272);
    assert_eq!(v["layers"].as_array().unwrap().len(), 30);
    let embed = v["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "model.embed_tokens.weight").unwrap();
    assert_eq!(embed["dtype"], "Q8_0");
    assert_eq!(embed["shape"], serde_json::json!([49152, 576]));
}

#[test]
fn greedy_generation_matches_reference_and_honours_stop() {
    let gguf = smollm2_gguf();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("reference_smollm2/reference.json")).unwrap(),
    )
    .unwrap();
    let p = &reference["prompts"][0];
    let want: Vec<u64> =
        p["greedy_continuation_ids"].as_array().unwrap()[..8].iter().map(|x| x.as_u64().unwrap()).collect();
    let prompt = p["text"].as_str().unwrap();
    let m = gguf.to_str().unwrap();
    let v = ok_json(&["generate", "--model", m, "--prompt", prompt, "--max-tokens", "8", "--json"]);
    let got: Vec<u64> = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(got, want);
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["prompt_tokens"], p["ids"].as_array().unwrap().len());

    let v = ok_json(&["generate", "--model", m, "--prompt", prompt, "--max-tokens", "8", "--stop", ".", "--json"]);
    assert_eq!(v["text"], " Paris");
    assert_eq!(v["finish_reason"], "stop");
}

#[test]
fn perplexity_on_a_text_file() {
    let gguf = smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    let para = "The river flows through the valley, past the old mill and the stone bridge, \
                and on towards the sea where the fishing boats wait for the morning tide. ";
    std::fs::write(&text, para.repeat(12)).unwrap();
    let v = ok_json(&[
        "eval",
        "perplexity",
        "--model",
        gguf.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--seq-len",
        "128",
        "--max-segments",
        "2",
        "--json",
    ]);
    let r = &v["report"];
    assert_eq!(r["segments"], 2);
    assert_eq!(r["tokens_evaluated"], 2 * 127);
    let ppl = r["perplexity"].as_f64().unwrap();
    // Repeated text is highly predictable after its first occurrence.
    assert!(ppl > 1.0 && ppl < 10.0, "perplexity {ppl}");
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(&["generate", "--model", "/no/such/model", "--prompt", "x"], &["/no/such/model", "not a known model"]);
    let bogus = dir.path().join("bogus.gguf");
    std::fs::write(&bogus, b"NOPE and more bytes").unwrap();
    fails_with(&["inspect", bogus.to_str().unwrap()], &["bogus.gguf", "not a GGUF file"]);
    let gguf = smollm2_gguf();
    let m = gguf.to_str().unwrap();
    fails_with(
        &["eval", "perplexity", "--model", m, "--data", "wiki", "--seq-len", "100000"],
        &["exceeds the model's context"],
    );
    fails_with(&["generate", "--model", m, "--prompt", "x", "--top-p", "0"], &["top_p"]);
    fails_with(&["data", "fetch", "nonsense"], &["nonsense"]);
    // Usage errors are clap's exit code 2.
    assert_eq!(lacuna(&["generate"]).status.code(), Some(2));
}

/// `--int8-lm-head` is the INT8 engine's option: in one bench run a W8A8 model takes the INT8
/// head and the float baseline keeps its float head.
#[test]
fn int8_lm_head_streams_fewer_bytes_and_is_cpu_only() {
    let gguf = smollm2_gguf();
    let m = gguf.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("w8a8");
    // The quickest W8A8 SmolLM2 (round-to-nearest, no smoothing, one short window): its bytes,
    // not its quality, are under test.
    ok_json(&[
        "quantize",
        "--model",
        m,
        "--rounding",
        "nearest",
        "--smoothquant-alpha",
        "0",
        "--skip-by-kurtosis",
        "0",
        "--calibration",
        "wiki:1x16",
        "--out",
        q.to_str().unwrap(),
        "--json",
    ]);
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--model",
            m,
            "--model",
            q.to_str().unwrap(),
            "--rounds",
            "1",
            "--prompt-len",
            "4",
            "--decode-tokens",
            "2",
            "--batch",
            "0",
        ];
        args.extend_from_slice(extra);
        args.push("--json");
        ok_json(&args)
    };
    let (f32_head, int8_head) = (bench(&[]), bench(&["--int8-lm-head"]));
    let heads = |v: &Value| -> Vec<Option<bool>> { (0..2).map(|i| v["models"][i]["int8_lm_head"].as_bool()).collect() };
    assert_eq!(heads(&f32_head), [Some(false), Some(false)]);
    assert_eq!(heads(&int8_head), [Some(false), Some(true)], "only the W8A8 model takes the INT8 head");
    let bytes = |v: &Value, i: usize| v["models"][i]["weight_bytes_per_token"].as_u64().unwrap();
    assert_eq!(bytes(&f32_head, 0), bytes(&int8_head, 0));
    // SmolLM2's tied head, 49152 × 576: f32 rows replaced by int8 codes and a scale per row.
    let (vocab, hidden) = (49152u64, 576u64);
    assert_eq!(bytes(&f32_head, 1) - bytes(&int8_head, 1), 4 * vocab * hidden - (vocab * hidden + 4 * vocab));
    fails_with(&["generate", "--model", m, "--prompt", "x", "--int8-lm-head", "--device", "cuda"], &["CPU engine"]);
}

/// `kill -9` in the middle of `lacuna prune`, then the same command again: it resumes from the
/// last finished block and writes exactly the weights of an uninterrupted run.
#[test]
fn prune_killed_mid_run_resumes_to_identical_weights() {
    let gguf = smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    let args = |out: &std::path::Path| -> Vec<String> {
        [
            "prune",
            "--model",
            gguf.to_str().unwrap(),
            "--method",
            "sparsegpt",
            "--sparsity",
            "0.5",
            "--calibration",
            "wiki:4x64",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let reference = dir.path().join("whole");
    let out =
        Command::new(env!("CARGO_BIN_EXE_lacuna")).args(args(&reference)).env("LACUNA_THREADS", "2").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let target = dir.path().join("killed");
    let state = dir.path().join("killed.checkpoint/state.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lacuna"))
        .args(args(&target))
        .env("LACUNA_THREADS", "2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let done = std::fs::read_to_string(&state)
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v["next_block"].as_u64())
            .unwrap_or(0);
        if done >= 2 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
        assert!(started.elapsed().as_secs() < 600, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!target.exists(), "a killed run must not leave an output that looks finished");

    let out =
        Command::new(env!("CARGO_BIN_EXE_lacuna")).args(args(&target)).env("LACUNA_THREADS", "2").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("resumed at block"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let a = std::fs::read(reference.join("model.safetensors")).unwrap();
    let b = std::fs::read(target.join("model.safetensors")).unwrap();
    assert!(a == b, "model.safetensors differs between the uninterrupted and the resumed run");
    assert!(!dir.path().join("killed.checkpoint").exists(), "the checkpoint is removed after success");
}

/// `GET path` over a plain socket: the status line's code.
fn http_status(port: u16, path: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad answer {resp:?}")))
}

#[test]
fn serve_answers_then_exits_zero_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let gguf = smollm2_gguf();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lacuna"))
        .args([
            "serve",
            "--model",
            gguf.to_str().unwrap(),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--grace-seconds",
            "5",
        ])
        .env("LACUNA_THREADS", "2")
        .env("RUST_LOG", "info")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run lacuna serve");
    // The port comes from the "serving" log line.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("serving") {
                let port =
                    line.split("port=").nth(1).and_then(|r| r.split(' ').next()).and_then(|p| p.parse::<u16>().ok());
                let _ = tx.send(port);
                sent = true;
            }
        }
    });
    let port = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("no `serving` line from lacuna serve")
        .expect("the `serving` line has no port");
    assert_eq!(http_status(port, "/ready").unwrap(), 200);
    assert_eq!(http_status(port, "/nowhere").unwrap(), 404);
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
    assert!(kill.success());
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "lacuna serve did not exit after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "lacuna serve exits 0 after SIGTERM");
}
