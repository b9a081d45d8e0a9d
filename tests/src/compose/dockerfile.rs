//! What a container of an image starts with, read from the image's Dockerfile (its last stage):
//! `ENV`, `WORKDIR`, `ENTRYPOINT`, `CMD`, `HEALTHCHECK` and the programs `COPY` puts on the PATH.

use std::path::Path;

/// The runtime stage of a Dockerfile, as far as starting a container of it goes.
#[derive(Debug, Default, Clone)]
pub struct Image {
    pub env: Vec<(String, String)>,
    pub workdir: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub healthcheck: Vec<String>,
    /// Programs copied into a directory on the image's PATH (`/usr/local/bin`, `/usr/bin`, `/bin`).
    pub programs: Vec<String>,
}

impl Image {
    pub fn read(dockerfile: &Path) -> Image {
        let text = std::fs::read_to_string(dockerfile).unwrap_or_else(|e| panic!("read {}: {e}", dockerfile.display()));
        let mut image = Image::default();
        for line in instructions(&text) {
            let (op, rest) = line.split_once(char::is_whitespace).unwrap_or((line.as_str(), ""));
            let rest = rest.trim();
            match op.to_ascii_uppercase().as_str() {
                "FROM" => image = Image::default(),
                "ENV" => image.env.extend(env_pairs(rest)),
                "WORKDIR" => image.workdir = rest.to_string(),
                "ENTRYPOINT" => image.entrypoint = exec_form(rest, "ENTRYPOINT"),
                "CMD" => image.cmd = exec_form(rest, "CMD"),
                "HEALTHCHECK" => {
                    let at = rest.find("CMD").unwrap_or_else(|| panic!("HEALTHCHECK without CMD: {rest}"));
                    image.healthcheck = exec_form(rest[at + 3..].trim(), "HEALTHCHECK CMD");
                }
                "COPY" => image.programs.extend(programs_copied(rest)),
                _ => {}
            }
        }
        image
    }

    /// `program` is in the image: copied onto its PATH by the Dockerfile.
    pub fn has_program(&self, program: &str) -> bool {
        self.programs.iter().any(|p| p == program)
    }
}

/// The Dockerfile's instructions, continuation lines joined, comments and blanks dropped.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// `ENV A=1 B=2` (the form our Dockerfiles use; values without spaces or quotes).
fn env_pairs(rest: &str) -> Vec<(String, String)> {
    rest.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("ENV {rest}: expected KEY=VALUE pairs"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// An instruction's JSON (exec) form; the shell form would run `/bin/sh -c`, which our images
/// are not meant to need.
fn exec_form(rest: &str, what: &str) -> Vec<String> {
    serde_json::from_str(rest).unwrap_or_else(|e| panic!("{what} {rest}: not the exec (JSON) form: {e}"))
}

/// `COPY [--from=x] SRC... DEST/`: the file names copied into a PATH directory.
fn programs_copied(rest: &str) -> Vec<String> {
    let words: Vec<&str> = rest.split_whitespace().filter(|w| !w.starts_with("--")).collect();
    let Some((dest, sources)) = words.split_last() else { return Vec::new() };
    let on_path = ["/usr/local/bin", "/usr/bin", "/bin"].contains(&dest.trim_end_matches('/'));
    if !on_path {
        return Vec::new();
    }
    sources.iter().map(|s| s.rsplit('/').next().unwrap_or(s).to_string()).collect()
}
