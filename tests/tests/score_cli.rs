//! `distill score` scores JSON lines with a model directory, in input order, as transformers does
//! (the tiny BERT fixture of shared/models), and refuses bad directories and lines clearly.

use distill_e2e::*;
use std::process::Command;

fn distill(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(bin("distill")).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn scores_json_lines_like_transformers() {
    let model = workspace_root().join("shared/models/tests/fixtures/bert");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("reference.json")).unwrap()).unwrap();
    let pairs: Vec<(String, String)> = serde_json::from_value(r["pairs"].clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("pairs.jsonl");
    let lines: String = pairs
        .iter()
        .enumerate()
        .map(|(i, (q, p))| serde_json::json!({"id": i, "query": q, "passage": p}).to_string() + "\n")
        .collect();
    std::fs::write(&input, lines).unwrap();
    let output = dir.path().join("scores.jsonl");
    let (ok, _, err) = distill(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--batch-size",
        "2",
        "--max-query-length",
        "8",
        "--max-length",
        "40",
    ]);
    assert!(ok, "{err}");
    let want: Vec<f64> = serde_json::from_value(r["logits"].clone()).unwrap();
    let got: Vec<serde_json::Value> =
        std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), want.len());
    for (i, (row, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(row["id"], i, "input order, other fields kept");
        let s = row["score"].as_f64().unwrap();
        assert!((s - w).abs() < 1e-4, "pair {i}: {s} vs transformers {w}");
    }

    // Bad inputs get clear errors.
    let (ok, _, err) = distill(&["score", "--model", dir.path().to_str().unwrap(), "--input", input.to_str().unwrap()]);
    assert!(!ok && err.contains("config.json"), "{err}");
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let (ok, _, err) = distill(&["score", "--model", dir.path().to_str().unwrap(), "--input", input.to_str().unwrap()]);
    assert!(!ok && err.contains("unsupported model_type 'gpt2'"), "{err}");
    std::fs::write(&input, "{\"query\": \"q\", \"passage\": \"p\"}\n{\"query\": \"q\"}\n").unwrap();
    let (ok, _, err) = distill(&["score", "--model", model.to_str().unwrap(), "--input", input.to_str().unwrap()]);
    assert!(!ok && err.contains("pairs.jsonl:2: missing string field \"passage\""), "{err}");
}

/// A Hub model id downloads the repository's files from `HF_ENDPOINT` (here a plain HTTP server on
/// 127.0.0.1 laid out as the Hub's `{repo}/resolve/{revision}/{file}` URLs) into the hub cache, and
/// scores exactly as the same files from a directory; a missing repository is named in the error.
#[test]
fn hub_model_ids_download_and_score_like_the_directory() {
    let fixture = workspace_root().join("shared/models/tests/fixtures/bert");
    let hub = tempfile::tempdir().unwrap();
    let repo = hub.path().join("distill-test/tiny-bert/resolve/main");
    std::fs::create_dir_all(&repo).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(f), repo.join(f)).unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = Command::new(python())
        .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string(), "--directory"])
        .arg(hub.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "http.server did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("pairs.jsonl");
    std::fs::write(&input, "{\"query\": \"columnar format\", \"passage\": \"parquet is a columnar storage format\"}\n{\"query\": \"rust\", \"passage\": \"memory safety without a garbage collector\"}\n").unwrap();
    let run = |model: &str| {
        let o = Command::new(bin("distill"))
            .args(["score", "--model", model, "--input"])
            .arg(&input)
            .env("HF_ENDPOINT", format!("http://127.0.0.1:{port}"))
            .env("DISTILL_HUB_CACHE", dir.path().join("cache"))
            .env_remove("HF_TOKEN")
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, from_dir, err) = run(fixture.to_str().unwrap());
    assert!(ok, "{err}");
    let (ok, from_hub, err) = run("hf://distill-test/tiny-bert");
    assert!(ok, "{err}");
    assert_eq!(from_hub, from_dir);
    assert!(dir.path().join("cache/distill-test--tiny-bert/main/model.safetensors").is_file());
    let (ok, _, err) = run("hf://distill-test/missing-model");
    assert!(!ok);
    assert!(err.contains("distill-test/missing-model/resolve/main/config.json"), "{err}");
    let _ = server.kill();
    let _ = server.wait();
}
