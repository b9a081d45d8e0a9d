//! What the operator lets requests reach (`docs/security.md`): every location a labelling spec
//! names must lie under the service's store or an `--allow-location` prefix, and an LLM teacher's
//! endpoint must be one of `--llm-endpoint`. Checked before a job exists (nothing is opened,
//! listed or probed first) and again when a job resumes after a restart.

use crate::error::Error;
use crate::llm::endpoints::Endpoints;
use distill_proto::{candidate_source::Source, teacher_spec::Teacher, LabelingSpec};
use distill_store::access::AllowList;
use std::sync::Arc;

/// The operator's grants to requests.
#[derive(Clone, Default)]
pub struct Grants {
    pub allow: Arc<AllowList>,
    pub endpoints: Arc<Endpoints>,
}

fn denied(field: &str, e: distill_store::access::Denied) -> Error {
    if e.invalid {
        return Error::InvalidArgument(format!("{field}: {}", e.what));
    }
    Error::PermissionDenied(format!(
        "{field}: {} (the operator allows more with --allow-location / DISTILL_ALLOW_LOCATIONS)",
        e.what
    ))
}

/// (field, value) pairs of a spec.
type Fields<'a> = Vec<(String, &'a str)>;

/// Every (field, location) a spec names; `models` are those that may also be Hub ids.
fn locations(spec: &LabelingSpec) -> (Fields<'_>, Fields<'_>) {
    let mut places: Fields = Vec::new();
    let mut models: Fields = Vec::new();
    match spec.source.as_ref().and_then(|s| s.source.as_ref()) {
        Some(Source::Trec(t)) => {
            for (f, v) in [("run", &t.run), ("queries", &t.queries), ("collection", &t.collection), ("qrels", &t.qrels)]
            {
                places.push((format!("source.trec.{f}"), v));
            }
        }
        Some(Source::Jsonl(j)) => places.push(("source.jsonl.path".into(), &j.path)),
        None => {}
    }
    match spec.teacher.as_ref().and_then(|t| t.teacher.as_ref()) {
        Some(Teacher::Precomputed(p)) => places.push(("teacher.precomputed.path".into(), &p.path)),
        Some(Teacher::CrossEncoders(e)) => {
            for (i, m) in e.models.iter().enumerate() {
                models.push((format!("teacher.cross_encoders.models[{i}]"), m));
            }
        }
        Some(Teacher::LocalLlm(l)) => places.push(("teacher.local_llm.model".into(), &l.model)),
        Some(Teacher::Llm(l)) => places.push(("teacher.llm.cache_uri".into(), &l.cache_uri)),
        Some(Teacher::FirstStage(_)) | None => {}
    }
    places.push(("output_uri".into(), &spec.output_uri));
    (places, models)
}

impl Grants {
    /// A location a request names (empty fields are left to validation).
    pub fn location(&self, field: &str, uri: &str) -> Result<(), Error> {
        if uri.trim().is_empty() {
            return Ok(());
        }
        self.allow.check(uri).map_err(|e| denied(field, e))
    }
}

/// Refuses a spec that names a location or endpoint the operator did not allow
/// (PERMISSION_DENIED naming the field). Empty fields are left to validation.
pub fn check(spec: &LabelingSpec, grants: &Grants) -> Result<(), Error> {
    let (places, models) = locations(spec);
    for (field, uri) in places {
        grants.location(&field, uri)?;
    }
    for (field, model) in models.into_iter().filter(|(_, u)| !u.trim().is_empty()) {
        grants.allow.check_model(model).map_err(|e| denied(&field, e))?;
    }
    if let Some(Teacher::Llm(l)) = spec.teacher.as_ref().and_then(|t| t.teacher.as_ref()) {
        grants.endpoints.resolve(&l.endpoint.clone().unwrap_or_default())?;
    }
    Ok(())
}
