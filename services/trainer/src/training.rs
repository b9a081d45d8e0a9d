//! A training job: stream groups from the datasets, train the student with the chosen objective
//! (AdamW, warmup + decay, clipping, accumulation), evaluate and checkpoint periodically, export
//! the final and the best model as Hugging Face checkpoints.
//!
//! Output layout (below the job's output URI):
//! ```text
//! checkpoints/step-00000100/{model.safetensors, optimizer.safetensors, state.json}
//! checkpoints/step-00000200-a1/  a checkpoint of the job's second attempt (after a resume)
//! checkpoints/latest.json      written last: names the newest complete checkpoint
//! metrics.jsonl, loss.svg      the history so far (rewritten at each checkpoint and at the end)
//! final/, best/                Hugging Face checkpoints (config.json, model.safetensors, tokenizer)
//! ```
//! A killed job resumes from `latest.json`: weights, optimizer moments and step, data position
//! and history come back, and dropout masks are seeded per (seed, step), so on CPU it ends with
//! the same weights as an uninterrupted run.

use crate::data::{self, Batch, GroupOptions, Position, StreamOptions};
use crate::evaluation::EvalData;
use crate::objectives::{Objective, ScoreGroups};
use crate::plot;
use crate::teacher_link::TeacherJob;
use crate::Error;
use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use distill_jobs::{JobEntry, Jobs};
use distill_models::optim::{AdamW, AdamWConfig, Grads};
use distill_models::CrossEncoder;
use distill_proto::{LrSchedule, Progress, TrainingSpec};
use distill_store::Location;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

/// Hyper-parameters with the defaults filled in.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Hyper {
    pub learning_rate: f64,
    pub batch_size: usize,
    pub group_size: usize,
    pub max_steps: u64,
    pub epochs: u64,
    pub warmup_steps: u64,
    pub schedule: String,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub accumulation: usize,
    pub seed: u64,
    pub max_query_length: usize,
    pub max_length: usize,
    pub temperature: f64,
    pub shuffle_buffer: usize,
    /// fp32, or bf16 (mixed precision: bf16 matmuls, f32 master weights).
    pub precision: String,
    pub checkpoint_every: u64,
    pub eval_every: u64,
}

impl Hyper {
    pub fn from_spec(spec: &TrainingSpec) -> Result<Self, Error> {
        let h = spec.hyperparameters.clone().unwrap_or_default();
        let or = |v: u32, d: usize| if v == 0 { d } else { v as usize };
        let hyper = Self {
            learning_rate: if h.learning_rate == 0.0 { 2e-5 } else { h.learning_rate },
            batch_size: or(h.batch_size, 8),
            group_size: or(h.group_size, 8),
            max_steps: h.max_steps,
            epochs: if h.epochs == 0 { 1 } else { h.epochs as u64 },
            warmup_steps: h.warmup_steps,
            schedule: match h.schedule() {
                LrSchedule::Unspecified | LrSchedule::Linear => "linear",
                LrSchedule::Cosine => "cosine",
                LrSchedule::Constant => "constant",
            }
            .into(),
            weight_decay: h.weight_decay.unwrap_or(0.01),
            max_grad_norm: h.max_grad_norm.unwrap_or(1.0),
            accumulation: or(h.gradient_accumulation, 1),
            seed: h.seed,
            max_query_length: or(h.max_query_length, 32),
            max_length: or(h.max_length, 256),
            temperature: if h.temperature == 0.0 { 1.0 } else { h.temperature },
            shuffle_buffer: or(h.shuffle_buffer, 1024),
            precision: if h.precision.is_empty() { "fp32".into() } else { h.precision.trim().to_ascii_lowercase() },
            checkpoint_every: if spec.checkpoint_every_steps == 0 { 100 } else { spec.checkpoint_every_steps },
            eval_every: spec.eval_every_steps,
        };
        distill_models::parse_precision(&hyper.precision)
            .map_err(|e| Error::InvalidArgument(format!("hyperparameters.{e}")))?;
        if !(hyper.learning_rate > 0.0 && hyper.learning_rate.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "hyperparameters.learning_rate: {} is not a positive number",
                hyper.learning_rate
            )));
        }
        if hyper.weight_decay < 0.0 || hyper.max_grad_norm < 0.0 {
            return Err(Error::InvalidArgument(
                "hyperparameters: weight_decay and max_grad_norm must not be negative".into(),
            ));
        }
        if hyper.max_length < 8 || hyper.max_query_length >= hyper.max_length {
            return Err(Error::InvalidArgument(format!(
                "hyperparameters: max_query_length ({}) must be below max_length ({}), and max_length at least 8",
                hyper.max_query_length, hyper.max_length
            )));
        }
        Ok(hyper)
    }

    /// The objective with this run's temperature.
    pub fn objective(&self, name: &str) -> Result<Objective, Error> {
        let o: Objective = name.parse()?;
        Ok(match o {
            Objective::InfoNce { .. } => Objective::InfoNce { temperature: self.temperature },
            Objective::KlDiv { .. } => Objective::KlDiv { temperature: self.temperature },
            Objective::AdrMse { .. } => Objective::AdrMse { temperature: self.temperature },
            o => o,
        })
    }

    /// The learning rate at (0-based) `step` of `total`: linear warmup, then the schedule's decay.
    pub fn lr(&self, step: u64, total: u64) -> f64 {
        let peak = self.learning_rate;
        if step < self.warmup_steps {
            return peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.schedule.as_str() {
            "constant" => peak,
            "cosine" => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            _ => peak * (1.0 - progress),
        }
    }
}

/// The dropout seed of one micro-batch.
fn dropout_seed(seed: u64, step: u64, micro: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ step.wrapping_mul(0xD6E8_FEB8_6659_FD93)
        ^ (micro as u64).wrapping_mul(0xA076_1D64_78BD_642F)
}

/// What a checkpoint's `state.json` holds besides the tensors.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub position: Position,
    pub history: Vec<serde_json::Value>,
    pub best: Option<Best>,
    pub total_steps: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Best {
    pub metric: String,
    pub value: f64,
    pub step: u64,
}

pub enum Outcome {
    Finished { steps: u64, best: Option<Best> },
    Cancelled,
}

/// Everything the loop needs, prepared before it starts.
pub struct Prepared {
    pub hyper: Hyper,
    pub objective: Objective,
    pub sources: Vec<data::Source>,
    pub total_steps: u64,
    pub groups_per_epoch: u64,
    pub backbone_dir: std::path::PathBuf,
    /// Encoder layers the student keeps (None: all).
    pub backbone_layers: Option<usize>,
    pub freeze_word_embeddings: bool,
    pub eval: Option<EvalData>,
    pub validation_metric: Option<String>,
    pub positive_from_labels: bool,
}

/// The data of a spec: committed datasets, or the dataset of a teacher job (followed while it runs;
/// if it has already committed, read as any committed dataset).
async fn open_sources(
    spec: &TrainingSpec,
    hyper: &Hyper,
    grants: &crate::access::Grants,
) -> Result<(Vec<data::Source>, data::DataSummary), Error> {
    let Some(link) = spec.teacher_job.as_ref().filter(|t| !t.job_id.is_empty() || !t.address.is_empty()) else {
        let readers = data::open_datasets(&spec.datasets).await?;
        let summary = data::summarize(&readers).await?;
        return Ok((readers.into_iter().map(data::Source::Committed).collect(), summary));
    };
    if !spec.datasets.is_empty() {
        return Err(Error::InvalidArgument("give either datasets or teacher_job, not both".into()));
    }
    let teacher = TeacherJob::connect(link, &grants.teachers).await?;
    let job = teacher.job().await?;
    // The teacher names where its dataset is: it must be a place this trainer may read.
    grants.location("teacher_job (its output_uri)", &job.output_uri)?;
    let (layout, fields) = crate::teacher_link::planned(&job)?;
    if job.state() == distill_proto::JobState::Succeeded {
        let readers = data::open_datasets(std::slice::from_ref(&job.output_uri)).await?;
        let summary = data::summarize(&readers).await?;
        return Ok((readers.into_iter().map(data::Source::Committed).collect(), summary));
    }
    teacher.check_alive().await?;
    if hyper.max_steps == 0 {
        return Err(Error::InvalidArgument(
            "teacher_job: following a running labelling job needs hyperparameters.max_steps (its size is not known yet)".into(),
        ));
    }
    let loc = distill_store::Location::parse(&job.output_uri)?;
    let growing = data::Source::Growing { data: distill_shards::GrowingDataset::new(loc), layout, teacher };
    Ok((vec![growing], data::DataSummary { fields, rows: 0 }))
}

/// Opens and checks everything a spec names; errors here are the caller's (INVALID_ARGUMENT).
pub async fn prepare(spec: &TrainingSpec, grants: &crate::access::Grants) -> Result<Prepared, Error> {
    crate::limits::check_training(spec)?;
    let hyper = Hyper::from_spec(spec)?;
    if spec.objective.trim().is_empty() {
        return Err(Error::InvalidArgument("objective is required".into()));
    }
    let objective = hyper.objective(&spec.objective)?;
    if spec.backbone.trim().is_empty() {
        return Err(Error::InvalidArgument(
            "backbone is required (a Hugging Face model directory or object-store prefix)".into(),
        ));
    }
    let (sources, summary) = open_sources(spec, &hyper, grants).await?;
    objective.check(&summary.fields).map_err(|e| Error::InvalidArgument(format!("objective: {e}")))?;
    let per_step = (hyper.batch_size * hyper.accumulation) as u64;
    let steps_per_epoch = summary.rows / per_step;
    let total_steps = if hyper.max_steps > 0 { hyper.max_steps } else { steps_per_epoch * hyper.epochs };
    if total_steps == 0 {
        return Err(Error::InvalidArgument(format!(
            "datasets: {} groups are fewer than one step's batch_size x gradient_accumulation = {per_step}",
            summary.rows
        )));
    }
    let backbone_dir = distill_store::materialize_dir(&spec.backbone)
        .await
        .map_err(|e| Error::InvalidArgument(format!("backbone: {e}")))?;
    if spec.backbone_layers > 0 {
        let config = backbone_dir.join("config.json");
        let have = std::fs::read(&config)
            .ok()
            .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
            .and_then(|v| v["num_hidden_layers"].as_u64())
            .ok_or_else(|| Error::InvalidArgument(format!("backbone: {}: no num_hidden_layers", config.display())))?;
        if spec.backbone_layers as u64 > have {
            return Err(Error::InvalidArgument(format!(
                "backbone_layers: {} but the backbone has {have} layers",
                spec.backbone_layers
            )));
        }
    }
    let (eval, validation_metric) = match &spec.evaluation {
        Some(e) if !e.run.is_empty() => {
            crate::evaluation::validate(e, false)?;
            let data = EvalData::load(e).await?;
            let metric = if spec.validation_metric.is_empty() {
                data.metrics[0].name.clone()
            } else {
                let want = distill_eval::parse_metrics(&spec.validation_metric)
                    .map_err(|e| Error::InvalidArgument(format!("validation_metric: {e}")))?;
                let name = want
                    .first()
                    .ok_or_else(|| Error::InvalidArgument("validation_metric: names no metric".into()))?
                    .name
                    .clone();
                if !data.metrics.iter().any(|m| m.name == name) {
                    return Err(Error::InvalidArgument(format!(
                        "validation_metric '{name}' is not among the evaluation's metrics"
                    )));
                }
                name
            };
            (Some(data), Some(metric))
        }
        _ => (None, None),
    };
    let positive_from_labels = summary.fields.lists && summary.fields.labels;
    Ok(Prepared {
        hyper,
        objective,
        sources,
        total_steps,
        groups_per_epoch: summary.rows,
        backbone_layers: (spec.backbone_layers > 0).then_some(spec.backbone_layers as usize),
        freeze_word_embeddings: spec.freeze_word_embeddings,
        backbone_dir,
        eval,
        validation_metric,
        positive_from_labels,
    })
}

/// Runs the job to its end (or cancellation) on the calling blocking thread.
pub fn run(
    prepared: Prepared,
    output: Location,
    jobs: Arc<Jobs>,
    entry: Arc<JobEntry>,
    handle: tokio::runtime::Handle,
    device: Device,
) -> Result<Outcome, Error> {
    let Prepared {
        hyper,
        objective,
        sources,
        total_steps,
        backbone_dir,
        backbone_layers,
        freeze_word_embeddings,
        eval,
        validation_metric,
        positive_from_labels,
        ..
    } = prepared;
    // This blocking thread runs every forward pass of the job, under these modes until it ends.
    let precision = distill_models::parse_precision(&hyper.precision).unwrap_or(None);
    let _modes = distill_models::layers::TrainingModes::set(precision, freeze_word_embeddings);
    let model = CrossEncoder::load_layers(
        &backbone_dir,
        hyper.max_query_length,
        hyper.max_length,
        &device,
        candle_core::DType::F32,
        backbone_layers,
    )?;
    let checkpoints = output.child("checkpoints");
    let mut state = TrainerState { total_steps, ..Default::default() };
    let mut opt = AdamW::new(&model.varmap, AdamWConfig { weight_decay: hyper.weight_decay, ..Default::default() })?;

    // Resume from the newest complete checkpoint, if any.
    let latest = handle.block_on(checkpoints.exists("latest.json"))?;
    if latest {
        let pointer: serde_json::Value = serde_json::from_slice(&handle.block_on(checkpoints.get("latest.json"))?)
            .map_err(|e| Error::Internal(format!("{}: {e}", checkpoints.uri_of("latest.json"))))?;
        let dir = checkpoints.child(pointer["dir"].as_str().unwrap_or_default());
        state = serde_json::from_slice(&handle.block_on(dir.get("state.json"))?)
            .map_err(|e| Error::Internal(format!("{}: {e}", dir.uri_of("state.json"))))?;
        let weights = candle_core::safetensors::load_buffer(&handle.block_on(dir.get("model.safetensors"))?, &device)?;
        let vars = model.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (name, var) in vars.iter() {
            let t = weights.get(name).ok_or_else(|| Error::Internal(format!("{}: no tensor '{name}'", dir.uri())))?;
            var.set(t)?;
        }
        drop(vars);
        let moments =
            candle_core::safetensors::load_buffer(&handle.block_on(dir.get("optimizer.safetensors"))?, &device)?;
        opt.load_state(&moments, state.step).map_err(|e| Error::Internal(format!("{}: {e}", dir.uri())))?;
        jobs.log(&entry, "info", format!("resumed from {} at step {}", dir.uri(), state.step));
    } else if model.new_head() {
        model.init_missing(hyper.seed)?;
        jobs.log(
            &entry,
            "info",
            format!("{}: no classification head in the backbone, a new one was initialised", backbone_dir.display()),
        );
    }

    let stream = StreamOptions {
        batch_size: hyper.batch_size,
        shuffle_buffer: hyper.shuffle_buffer,
        seed: hyper.seed,
        groups: GroupOptions { group_size: hyper.group_size, positive_from_labels },
        epochs: if hyper.max_steps > 0 { None } else { Some(hyper.epochs) },
    };
    let (batches, _producer) = data::spawn_producer(sources, model.tokenizer.clone(), stream, state.position, 4);

    let mut window = (0f64, 0u64, 0usize, Instant::now()); // loss sum, steps, pairs, since
    while state.step < total_steps {
        if entry.cancel.is_cancelled() {
            return Ok(Outcome::Cancelled);
        }
        let step = state.step;
        let mut grads: Option<Grads> = None;
        let mut loss_value = 0f64;
        let mut pairs = 0usize;
        for micro in 0..hyper.accumulation {
            let Some(batch) = next_batch(&batches, &entry)? else { return Ok(Outcome::Cancelled) };
            let batch = batch.to_device(&device)?;
            distill_models::layers::seed_dropout(Some(dropout_seed(hyper.seed, step, micro)));
            let scores = model
                .backbone
                .forward(&batch.input_ids, &batch.token_type_ids, &batch.attention_mask, true)?
                .reshape((batch.groups, batch.width))?;
            let groups = ScoreGroups {
                scores,
                mask: batch.mask.clone(),
                labels: Some(batch.labels.clone()),
                teacher_scores: batch.teacher_scores.clone(),
                teacher_ranks: batch.teacher_ranks.clone(),
            };
            let loss = objective.loss(&groups)?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(Error::Diverged(format!(
                    "the {} loss became {value} at step {} (micro-batch {micro}); lower the learning rate or check the teacher scores",
                    objective.name(),
                    step + 1
                )));
            }
            loss_value += value / hyper.accumulation as f64;
            let loss = (loss / hyper.accumulation as f64)?;
            let g = opt.grads(&loss.backward()?);
            match &mut grads {
                Some(acc) => acc.accumulate(g)?,
                None => grads = Some(g),
            }
            pairs += batch.groups * batch.width;
            state.position = Position { epoch: batch.epoch, consumed: batch.consumed };
        }
        distill_models::layers::seed_dropout(None);
        let grads = grads.expect("at least one micro-batch");
        let lr = hyper.lr(step, total_steps);
        // Clipping by global norm on the device, the update scaling inside (on CUDA no host read
        // between the backward pass and the update); the norm read once the update is queued. A
        // non-finite norm fails the job before anything is saved.
        let grad_norm = match grads.clip_on_device(hyper.max_grad_norm)? {
            Some((norm, coef)) => {
                opt.update_scaled(&grads, lr, Some(&coef))?;
                norm.to_vec1::<f32>()?[0] as f64
            }
            None => {
                let norm = grads.global_norm()?;
                if norm.is_finite() {
                    opt.update(&grads, lr)?;
                }
                norm
            }
        };
        if !grad_norm.is_finite() {
            return Err(Error::Diverged(format!("the gradient norm became {grad_norm} at step {}", step + 1)));
        }
        state.step += 1;
        window.0 += loss_value;
        window.1 += 1;
        window.2 += pairs;

        let log_every = (total_steps / 200).max(1);
        let last = state.step == total_steps;
        if state.step.is_multiple_of(log_every) || last {
            let secs = window.3.elapsed().as_secs_f64().max(1e-9);
            let record = serde_json::json!({
                "step": state.step, "epoch": state.position.epoch, "loss": window.0 / window.1 as f64,
                "lr": lr, "grad_norm": grad_norm, "pairs_per_s": window.2 as f64 / secs,
            });
            state.history.push(record);
            let counters = HashMap::from([
                ("loss".to_string(), window.0 / window.1 as f64),
                ("lr".to_string(), lr),
                ("pairs_per_s".to_string(), window.2 as f64 / secs),
                ("epoch".to_string(), state.position.epoch as f64),
            ]);
            let progress =
                Progress { done: state.step, total: total_steps, unit: "steps".into(), counters, ..Default::default() };
            handle.block_on(jobs.set_progress(&entry, progress, false));
            jobs.metric(&entry, "loss", window.0 / window.1 as f64, state.step);
            window = (0.0, 0, 0, Instant::now());
        }

        let eval_due =
            eval.is_some() && ((hyper.eval_every > 0 && state.step.is_multiple_of(hyper.eval_every)) || last);
        if eval_due {
            let data = eval.as_ref().expect("checked");
            let stop = || if entry.cancel.is_cancelled() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
            let Some(run) = data.rerank(&model, 32, |_, _| stop())? else { return Ok(Outcome::Cancelled) };
            let values = data.measure(&run);
            let mut record = serde_json::json!({"step": state.step});
            for (name, v) in &values {
                record[format!("eval_{name}")] = (*v).into();
                jobs.metric(&entry, &format!("eval_{name}"), *v, state.step);
            }
            state.history.push(record);
            let metric = validation_metric.clone().expect("set with the evaluation");
            let value = values.iter().find(|(n, _)| *n == metric).map(|(_, v)| *v).unwrap_or(f64::NAN);
            jobs.log(&entry, "info", format!("step {}: {metric} = {value:.4}", state.step));
            if state.best.as_ref().is_none_or(|b| value > b.value) {
                state.best = Some(Best { metric, value, step: state.step });
                handle.block_on(jobs.confirm(&entry))?;
                handle.block_on(export(&model, &output.child("best")))?;
            }
        }

        if state.step.is_multiple_of(hyper.checkpoint_every) && !last {
            handle.block_on(save_checkpoint(&model, &opt, &state, &checkpoints, (&jobs, &entry)))?;
            handle.block_on(write_history(&state, &output))?;
        }
    }
    // Exports, like checkpoints, only while this replica holds the job.
    handle.block_on(jobs.confirm(&entry))?;
    handle.block_on(export(&model, &output.child("final")))?;
    handle.block_on(write_history(&state, &output))?;
    Ok(Outcome::Finished { steps: state.step, best: state.best })
}

async fn put_tensors(loc: &Location, name: &str, tensors: &HashMap<String, Tensor>) -> Result<(), Error> {
    let tmp = tempfile::NamedTempFile::new().map_err(|e| Error::Internal(format!("temp file: {e}")))?;
    candle_core::safetensors::save(tensors, tmp.path())?;
    let bytes = std::fs::read(tmp.path()).map_err(|e| Error::Internal(format!("temp file: {e}")))?;
    loc.put(name, Bytes::from(bytes)).await?;
    Ok(())
}

/// The next batch, waiting as long as the data takes (a dataset still being labelled) but giving
/// `None` within 0.2 s of the job being cancelled.
fn next_batch(
    batches: &std::sync::mpsc::Receiver<Result<Batch, Error>>,
    entry: &JobEntry,
) -> Result<Option<Batch>, Error> {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        match batches.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(batch) => return batch.map(Some),
            Err(RecvTimeoutError::Timeout) if entry.cancel.is_cancelled() => return Ok(None),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return Err(Error::Internal("the data stream ended early".into())),
        }
    }
}

/// Writes a checkpoint, then points `latest.json` at it (so a half-written one is never used),
/// then removes older checkpoints. Each step is taken only while this replica holds the job
/// (`holder`), and each attempt writes its own directory (`step-N-aK` after K resumes), so an
/// attempt that lost the job while writing never overwrites what the new holder wrote.
async fn save_checkpoint(
    model: &CrossEncoder,
    opt: &AdamW,
    state: &TrainerState,
    checkpoints: &Location,
    (jobs, entry): (&Jobs, &JobEntry),
) -> Result<(), Error> {
    let name = match entry.snapshot().resumes {
        0 => format!("step-{:08}", state.step),
        attempt => format!("step-{:08}-a{attempt}", state.step),
    };
    jobs.confirm(entry).await?;
    let dir = checkpoints.child(&name);
    put_tensors(&dir, "model.safetensors", &model.tensors()).await?;
    put_tensors(&dir, "optimizer.safetensors", &opt.state()).await?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Internal(e.to_string()))?;
    dir.put("state.json", Bytes::from(json)).await?;
    jobs.confirm(entry).await?;
    let pointer = serde_json::json!({"step": state.step, "dir": name});
    checkpoints.put("latest.json", Bytes::from(pointer.to_string())).await?;
    // Earlier checkpoints are no longer needed (later ones, which only a newer attempt can have
    // written, are not this attempt's to remove).
    let mut older = std::collections::BTreeSet::new();
    for obj in checkpoints.list_recursive().await? {
        if let Some((d, _)) = obj.split_once('/') {
            if checkpoint_step(d).is_some_and(|s| s < state.step) {
                older.insert(d.to_string());
            }
        }
    }
    for d in older {
        checkpoints.child(&d).delete_all().await?;
    }
    Ok(())
}

/// The step of a checkpoint directory's name (`step-00000100` or `step-00000100-a2`).
fn checkpoint_step(dir: &str) -> Option<u64> {
    let rest = dir.strip_prefix("step-")?;
    rest.split('-').next()?.parse().ok()
}

/// Saves a Hugging Face checkpoint of the model below `loc`.
pub async fn export(model: &CrossEncoder, loc: &Location) -> Result<(), Error> {
    let tmp = tempfile::tempdir().map_err(|e| Error::Internal(format!("temp dir: {e}")))?;
    model.save(tmp.path())?;
    loc.upload_dir(tmp.path()).await?;
    Ok(())
}

async fn write_history(state: &TrainerState, output: &Location) -> Result<(), Error> {
    let mut jsonl = String::new();
    for r in &state.history {
        jsonl.push_str(&r.to_string());
        jsonl.push('\n');
    }
    output.put("metrics.jsonl", Bytes::from(jsonl)).await?;
    let loss: Vec<(f64, f64)> =
        state.history.iter().filter_map(|r| Some((r["step"].as_f64()?, r["loss"].as_f64()?))).collect();
    output.put("loss.svg", Bytes::from(plot::line_chart("training loss", "step", "loss", &[("loss", &loss)]))).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hyper(schedule: LrSchedule, warmup: u64) -> Hyper {
        let spec = TrainingSpec {
            hyperparameters: Some(distill_proto::Hyperparameters {
                learning_rate: 1e-3,
                warmup_steps: warmup,
                schedule: schedule as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        Hyper::from_spec(&spec).unwrap()
    }

    #[test]
    fn schedules_warm_up_then_decay_as_transformers_does() {
        // transformers' get_linear_schedule_with_warmup: lr * step / warmup, then
        // lr * (total - step) / (total - warmup); our step is 0-based, applied after step+1 updates.
        let h = hyper(LrSchedule::Linear, 4);
        let lrs: Vec<f64> = (0..10).map(|s| h.lr(s, 10)).collect();
        assert!((lrs[0] - 0.25e-3).abs() < 1e-12 && (lrs[3] - 1e-3).abs() < 1e-12);
        assert!((lrs[4] - 1e-3).abs() < 1e-12);
        assert!((lrs[7] - 0.5e-3).abs() < 1e-12);
        assert!(lrs.windows(2).skip(4).all(|w| w[1] < w[0]));
        let c = hyper(LrSchedule::Cosine, 0);
        assert!((c.lr(0, 10) - 1e-3).abs() < 1e-12 && (c.lr(5, 10) - 0.5e-3).abs() < 1e-12);
        let k = hyper(LrSchedule::Constant, 2);
        assert_eq!(k.lr(9, 10), 1e-3);
    }

    #[test]
    fn bad_hyperparameters_name_the_field() {
        let mut spec = TrainingSpec {
            hyperparameters: Some(distill_proto::Hyperparameters { learning_rate: -1.0, ..Default::default() }),
            ..Default::default()
        };
        assert!(Hyper::from_spec(&spec).unwrap_err().to_string().contains("learning_rate"));
        spec.hyperparameters =
            Some(distill_proto::Hyperparameters { max_query_length: 64, max_length: 32, ..Default::default() });
        assert!(Hyper::from_spec(&spec).unwrap_err().to_string().contains("max_query_length"));
    }
}
