//! `distill label` run again for a job the teacher already has (a Kubernetes pod retried, a
//! command repeated after a disconnect): it rejoins that job instead of starting a second one,
//! which the first one's partial output would refuse.

use crate::client::Teacher;
use distill_proto as pb;

/// Starts the labelling job `spec` describes, or rejoins the teacher's job with the same spec
/// (API key aside) and output: an unfinished one is followed, a FAILED one resumed from its
/// progress records. Anything else (none, or only succeeded or cancelled ones) starts a new job.
pub async fn start_or_rejoin(client: &mut Teacher, spec: pb::LabelingSpec) -> anyhow::Result<pb::Job> {
    match twin(client, &spec).await? {
        Some(job) if job.state() == pb::JobState::Failed => {
            eprintln!("job {} labelled this before and failed ({}): resuming it", job.id, job.error);
            Ok(client.resume_job(pb::ResumeJobRequest { id: job.id }).await?.into_inner())
        }
        Some(job) => {
            eprintln!("job {} already labels this into {}: following it", job.id, job.output_uri);
            Ok(job)
        }
        None => Ok(client.start_labeling(spec).await?.into_inner()),
    }
}

/// The newest unfinished or FAILED labelling job of the teacher with `spec` (API key aside) and
/// its output; none for a spec without an output (each such job writes a dataset of its own).
async fn twin(client: &mut Teacher, spec: &pb::LabelingSpec) -> anyhow::Result<Option<pb::Job>> {
    if spec.output_uri.is_empty() {
        return Ok(None);
    }
    let wanted = without_key(spec.clone());
    let jobs = client.list_jobs(pb::ListJobsRequest::default()).await?.into_inner().jobs;
    Ok(jobs.into_iter().rev().find(|j| {
        let same = match j.spec.as_ref().and_then(|s| s.spec.as_ref()) {
            Some(pb::job_spec::Spec::Labeling(l)) => without_key(l.clone()) == wanted,
            _ => false,
        };
        let open = !j.state().is_terminal() || j.state() == pb::JobState::Failed;
        same && open && j.output_uri == spec.output_uri
    }))
}

/// The spec as the teacher keeps it: an API key given in it is taken out when the job starts.
fn without_key(mut spec: pb::LabelingSpec) -> pb::LabelingSpec {
    if let Some(pb::teacher_spec::Teacher::Llm(l)) = spec.teacher.as_mut().and_then(|t| t.teacher.as_mut()) {
        if let Some(e) = l.endpoint.as_mut() {
            e.api_key.clear();
        }
    }
    spec
}
