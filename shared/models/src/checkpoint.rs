//! Loading Hugging Face safetensors into trainable variables.

use crate::{ModelError, Result};
use candle_core::Device;
use candle_nn::VarMap;
use std::path::Path;

/// What a load found: names the model has that the file lacks (initialised fresh, e.g. a new
/// head) and names the file has that the model does not use.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
}

/// Copies the tensors of a safetensors file into the variables of `varmap` with the same names.
/// A bare encoder's names (no `bert.` prefix, as sentence-transformers saves them) are matched
/// too. A shape mismatch is an error naming the tensor.
pub fn load_safetensors(varmap: &VarMap, path: &Path, device: &Device) -> Result<LoadReport> {
    let file = path.display().to_string();
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| ModelError::Invalid { path: file.clone(), message: format!("not readable safetensors: {e}") })?;
    let mut report = LoadReport::default();
    let mut used = std::collections::HashSet::new();
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let found = [name.clone(), name.split_once('.').map(|(_, rest)| rest.to_string()).unwrap_or_default()]
            .into_iter()
            .find(|n| tensors.contains_key(n));
        match found {
            Some(key) => {
                let t = &tensors[&key];
                if t.dims() != var.dims() {
                    return Err(ModelError::Invalid {
                        path: file,
                        message: format!("tensor '{key}' has shape {:?}, the model wants {:?}", t.dims(), var.dims()),
                    });
                }
                var.set(&t.to_dtype(var.dtype())?)?;
                used.insert(key);
            }
            None => report.missing.push(name.clone()),
        }
    }
    report.unexpected = tensors.keys().filter(|k| !used.contains(*k)).cloned().collect();
    report.unexpected.sort();
    Ok(report)
}
