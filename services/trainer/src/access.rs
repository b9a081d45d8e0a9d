//! What the operator lets requests reach (`docs/security.md`): every location a training or
//! evaluation spec names must lie under the service's store or an `--allow-location` prefix, and a
//! followed teacher must be one of `--allow-teacher`. Checked before a job exists (nothing is
//! opened or downloaded first) and again when a job resumes after a restart.

use crate::teacher_link::TeacherLinks;
use crate::Error;
use distill_proto::{EvaluationSpec, TrainingSpec};
use distill_store::access::{AllowList, Denied};
use std::sync::Arc;

/// The operator's grants to requests.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    pub allow: Arc<AllowList>,
    pub teachers: TeacherLinks,
}

fn denied(field: &str, e: Denied) -> Error {
    if e.invalid {
        return Error::InvalidArgument(format!("{field}: {}", e.what));
    }
    Error::PermissionDenied(format!(
        "{field}: {} (the operator allows more with --allow-location / DISTILL_ALLOW_LOCATIONS)",
        e.what
    ))
}

impl Grants {
    /// A location a request names (empty fields are left to validation).
    pub fn location(&self, field: &str, uri: &str) -> Result<(), Error> {
        if uri.trim().is_empty() {
            return Ok(());
        }
        self.allow.check(uri).map_err(|e| denied(field, e))
    }

    /// A model a request names: a location or a Hub id.
    pub fn model(&self, field: &str, model: &str) -> Result<(), Error> {
        if model.trim().is_empty() {
            return Ok(());
        }
        self.allow.check_model(model).map_err(|e| denied(field, e))
    }

    /// The files of an evaluation (`prefix` names the spec's field, e.g. "evaluation.").
    fn evaluation_files(&self, prefix: &str, e: &EvaluationSpec) -> Result<(), Error> {
        for (f, v) in [("run", &e.run), ("queries", &e.queries), ("collection", &e.collection), ("qrels", &e.qrels)] {
            self.location(&format!("{prefix}{f}"), v)?;
        }
        Ok(())
    }

    /// Refuses a training spec naming anything the operator did not allow (PERMISSION_DENIED).
    pub fn check_training(&self, spec: &TrainingSpec) -> Result<(), Error> {
        for (i, d) in spec.datasets.iter().enumerate() {
            self.location(&format!("datasets[{i}]"), d)?;
        }
        self.model("backbone", &spec.backbone)?;
        self.location("output_uri", &spec.output_uri)?;
        if let Some(e) = &spec.evaluation {
            self.evaluation_files("evaluation.", e)?;
        }
        if let Some(t) = spec.teacher_job.as_ref().filter(|t| !t.address.trim().is_empty()) {
            self.teachers.check(&t.address)?;
        }
        Ok(())
    }

    /// Refuses an evaluation spec naming anything the operator did not allow (PERMISSION_DENIED).
    pub fn check_evaluation(&self, spec: &EvaluationSpec) -> Result<(), Error> {
        self.model("model", &spec.model)?;
        self.evaluation_files("", spec)?;
        self.location("output_uri", &spec.output_uri)
    }
}
