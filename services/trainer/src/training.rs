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
use crate::teacher_link::TeacherJob;
use crate::Error;
use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use distill_eval::plot;
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

/// A job's record and runtime as its blocking thread reaches them: where it reports progress,
/// which entry it is, and the runtime its store calls run on.
pub struct JobContext {
    pub jobs: Arc<Jobs>,
    pub entry: Arc<JobEntry>,
    pub runtime: tokio::runtime::Handle,
}

/// Runs the job to its end (or cancellation) on the calling blocking thread.
pub fn run(prepared: Prepared, output: Location, job: JobContext, device: Device) -> Result<Outcome, Error> {
    // This blocking thread runs every forward pass of the job, under these modes until it ends.
    let precision = distill_models::parse_precision(&prepared.hyper.precision).unwrap_or(None);
    let _modes = distill_models::layers::TrainingModes::set(precision, prepared.freeze_word_embeddings);
    let (mut job, sources) = TrainingRun::start(prepared, output, job, device)?;
    let hyper = &job.hyper;
    let stream = StreamOptions {
        batch_size: hyper.batch_size,
        shuffle_buffer: hyper.shuffle_buffer,
        seed: hyper.seed,
        groups: GroupOptions { group_size: hyper.group_size, positive_from_labels: job.positive_from_labels },
        epochs: if hyper.max_steps > 0 { None } else { Some(hyper.epochs) },
    };
    let tokenizer = job.model.tokenizer.clone();
    let (batches, _producer) = data::spawn_producer(sources, tokenizer, stream, job.state.position, 4);
    while job.state.step < job.total_steps {
        let Some(done) = job.step(&batches)? else { return Ok(Outcome::Cancelled) };
        let last = job.state.step == job.total_steps;
        job.log(done, last);
        if job.eval_due(last) && job.evaluate()?.is_none() {
            return Ok(Outcome::Cancelled);
        }
        if job.state.step.is_multiple_of(job.hyper.checkpoint_every) && !last {
            job.checkpoint()?;
        }
    }
    job.finish()
}

/// What one optimizer step did: its loss (mean over micro-batches), pairs scored, learning rate
/// and gradient norm.
struct StepDone {
    loss: f64,
    pairs: usize,
    lr: f64,
    grad_norm: f64,
}

/// Losses, steps and pairs since the last log line, and since when.
struct Window {
    loss: f64,
    steps: u64,
    pairs: usize,
    since: Instant,
}

/// A training job in progress on its blocking thread: the model, its optimizer and state, what it
/// is trained and evaluated with, and where it reports to.
struct TrainingRun {
    model: CrossEncoder,
    opt: AdamW,
    state: TrainerState,
    hyper: Hyper,
    objective: Objective,
    total_steps: u64,
    eval: Option<EvalData>,
    validation_metric: Option<String>,
    positive_from_labels: bool,
    output: Location,
    jobs: Arc<Jobs>,
    entry: Arc<JobEntry>,
    handle: tokio::runtime::Handle,
    device: Device,
    window: Window,
}

impl TrainingRun {
    /// Loads the student, then resumes from the newest complete checkpoint if there is one (or
    /// initialises a head the backbone lacks). Returns the run and the data sources.
    fn start(
        prepared: Prepared,
        output: Location,
        JobContext { jobs, entry, runtime: handle }: JobContext,
        device: Device,
    ) -> Result<(TrainingRun, Vec<data::Source>), Error> {
        let Prepared { hyper, objective, sources, total_steps, backbone_dir, backbone_layers, .. } = prepared;
        let (mql, ml) = (hyper.max_query_length, hyper.max_length);
        let model = CrossEncoder::load_layers(&backbone_dir, mql, ml, &device, DType::F32, backbone_layers)?;
        let opt = AdamW::new(&model.varmap, AdamWConfig { weight_decay: hyper.weight_decay, ..Default::default() })?;
        let mut job = TrainingRun {
            model,
            opt,
            state: TrainerState { total_steps, ..Default::default() },
            hyper,
            objective,
            total_steps,
            eval: prepared.eval,
            validation_metric: prepared.validation_metric,
            positive_from_labels: prepared.positive_from_labels,
            output,
            jobs,
            entry,
            handle,
            device,
            window: Window { loss: 0.0, steps: 0, pairs: 0, since: Instant::now() },
        };
        if !job.resume()? && job.model.new_head() {
            job.model.init_missing(job.hyper.seed)?;
            let why = format!(
                "{}: no classification head in the backbone, a new one was initialised",
                backbone_dir.display()
            );
            job.jobs.log(&job.entry, "info", why);
        }
        Ok((job, sources))
    }

    /// Takes weights, optimizer moments and state from the newest complete checkpoint, if any.
    fn resume(&mut self) -> Result<bool, Error> {
        let checkpoints = self.output.child("checkpoints");
        if !self.handle.block_on(checkpoints.exists("latest.json"))? {
            return Ok(false);
        }
        let get = |loc: &Location, name: &str| self.handle.block_on(loc.get(name));
        let pointer: serde_json::Value = serde_json::from_slice(&get(&checkpoints, "latest.json")?)
            .map_err(|e| Error::Internal(format!("{}: {e}", checkpoints.uri_of("latest.json"))))?;
        let dir = checkpoints.child(pointer["dir"].as_str().unwrap_or_default());
        self.state = serde_json::from_slice(&get(&dir, "state.json")?)
            .map_err(|e| Error::Internal(format!("{}: {e}", dir.uri_of("state.json"))))?;
        let weights = candle_core::safetensors::load_buffer(&get(&dir, "model.safetensors")?, &self.device)?;
        let vars = self.model.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (name, var) in vars.iter() {
            let t = weights.get(name).ok_or_else(|| Error::Internal(format!("{}: no tensor '{name}'", dir.uri())))?;
            var.set(t)?;
        }
        drop(vars);
        let moments = candle_core::safetensors::load_buffer(&get(&dir, "optimizer.safetensors")?, &self.device)?;
        self.opt.load_state(&moments, self.state.step).map_err(|e| Error::Internal(format!("{}: {e}", dir.uri())))?;
        self.jobs.log(&self.entry, "info", format!("resumed from {} at step {}", dir.uri(), self.state.step));
        Ok(true)
    }

    /// One optimizer step over `accumulation` micro-batches; `None` when the job was cancelled.
    fn step(&mut self, batches: &std::sync::mpsc::Receiver<Result<Batch, Error>>) -> Result<Option<StepDone>, Error> {
        if self.entry.cancel.is_cancelled() {
            return Ok(None);
        }
        let step = self.state.step;
        let mut grads: Option<Grads> = None;
        let (mut loss, mut pairs) = (0f64, 0usize);
        for micro in 0..self.hyper.accumulation {
            let Some(batch) = next_batch(batches, &self.entry)? else { return Ok(None) };
            let batch = batch.to_device(&self.device)?;
            distill_models::layers::seed_dropout(Some(dropout_seed(self.hyper.seed, step, micro)));
            let (value, g) = self.micro_step(&batch, micro)?;
            loss += value / self.hyper.accumulation as f64;
            match &mut grads {
                Some(acc) => acc.accumulate(g)?,
                None => grads = Some(g),
            }
            pairs += batch.groups * batch.width;
            self.state.position = Position { epoch: batch.epoch, consumed: batch.consumed };
        }
        distill_models::layers::seed_dropout(None);
        let lr = self.hyper.lr(step, self.total_steps);
        let grad_norm = self.update(&grads.expect("at least one micro-batch"), lr)?;
        self.state.step += 1;
        Ok(Some(StepDone { loss, pairs, lr, grad_norm }))
    }

    /// The loss of one micro-batch and its gradients (scaled for the accumulation).
    fn micro_step(&self, batch: &Batch, micro: usize) -> Result<(f64, Grads), Error> {
        let scores = self
            .model
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
        let loss = self.objective.loss(&groups)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::Diverged(format!(
                "the {} loss became {value} at step {} (micro-batch {micro}); lower the learning rate or check the teacher scores",
                self.objective.name(),
                self.state.step + 1
            )));
        }
        let loss = (loss / self.hyper.accumulation as f64)?;
        Ok((value, self.opt.grads(&loss.backward()?)))
    }

    /// Clips by global norm on the device, the update scaling inside (on CUDA no host read between
    /// the backward pass and the update), and applies AdamW; the norm is read once the update is
    /// queued. A non-finite norm fails the job before anything is saved.
    fn update(&mut self, grads: &Grads, lr: f64) -> Result<f64, Error> {
        let grad_norm = match grads.clip_on_device(self.hyper.max_grad_norm)? {
            Some((norm, coef)) => {
                self.opt.update_scaled(grads, lr, Some(&coef))?;
                norm.to_vec1::<f32>()?[0] as f64
            }
            None => {
                let norm = grads.global_norm()?;
                if norm.is_finite() {
                    self.opt.update(grads, lr)?;
                }
                norm
            }
        };
        if !grad_norm.is_finite() {
            return Err(Error::Diverged(format!(
                "the gradient norm became {grad_norm} at step {}",
                self.state.step + 1
            )));
        }
        Ok(grad_norm)
    }

    /// Adds the step to the window; every 1/200 of the run (and at the end) records the window's
    /// mean loss, learning rate, gradient norm and speed in the history and the job's progress.
    fn log(&mut self, done: StepDone, last: bool) {
        let w = &mut self.window;
        (w.loss, w.steps, w.pairs) = (w.loss + done.loss, w.steps + 1, w.pairs + done.pairs);
        let log_every = (self.total_steps / 200).max(1);
        if !self.state.step.is_multiple_of(log_every) && !last {
            return;
        }
        let (loss, secs) = (w.loss / w.steps as f64, w.since.elapsed().as_secs_f64().max(1e-9));
        let pairs_per_s = w.pairs as f64 / secs;
        let epoch = self.state.position.epoch;
        self.state.history.push(serde_json::json!({
            "step": self.state.step, "epoch": epoch, "loss": loss,
            "lr": done.lr, "grad_norm": done.grad_norm, "pairs_per_s": pairs_per_s,
        }));
        let counters = HashMap::from([
            ("loss".to_string(), loss),
            ("lr".to_string(), done.lr),
            ("pairs_per_s".to_string(), pairs_per_s),
            ("epoch".to_string(), epoch as f64),
        ]);
        let (step, total) = (self.state.step, self.total_steps);
        let progress = Progress { done: step, total, unit: "steps".into(), counters, ..Default::default() };
        self.handle.block_on(self.jobs.set_progress(&self.entry, progress, false));
        self.jobs.metric(&self.entry, "loss", loss, step);
        self.window = Window { loss: 0.0, steps: 0, pairs: 0, since: Instant::now() };
    }

    /// Whether the model is evaluated after this step: every `eval_every` steps and after the last.
    fn eval_due(&self, last: bool) -> bool {
        let every = self.hyper.eval_every;
        self.eval.is_some() && ((every > 0 && self.state.step.is_multiple_of(every)) || last)
    }

    /// Re-ranks the evaluation run, records its metrics, and exports the model as `best/` when the
    /// validation metric improved. `None` when the job was cancelled meanwhile.
    fn evaluate(&mut self) -> Result<Option<()>, Error> {
        let data = self.eval.as_ref().expect("evaluated only with evaluation data");
        let entry = &self.entry;
        let stop = || if entry.cancel.is_cancelled() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) };
        let Some(run) = data.rerank(&self.model, 32, |_, _| stop())? else { return Ok(None) };
        let values = data.measure(&run);
        let step = self.state.step;
        let mut record = serde_json::json!({"step": step});
        for (name, v) in &values {
            record[format!("eval_{name}")] = (*v).into();
            self.jobs.metric(entry, &format!("eval_{name}"), *v, step);
        }
        self.state.history.push(record);
        let metric = self.validation_metric.clone().expect("set with the evaluation");
        let value = values.iter().find(|(n, _)| *n == metric).map(|(_, v)| *v).unwrap_or(f64::NAN);
        self.jobs.log(entry, "info", format!("step {step}: {metric} = {value:.4}"));
        if self.state.best.as_ref().is_none_or(|b| value > b.value) {
            self.state.best = Some(Best { metric, value, step });
            // Exports, like checkpoints, only while this replica holds the job.
            self.handle.block_on(self.jobs.confirm(entry))?;
            self.handle.block_on(export(&self.model, &self.output.child("best")))?;
        }
        Ok(Some(()))
    }

    fn checkpoint(&self) -> Result<(), Error> {
        let checkpoints = self.output.child("checkpoints");
        let holder = (self.jobs.as_ref(), self.entry.as_ref());
        self.handle.block_on(save_checkpoint(&self.model, &self.opt, &self.state, &checkpoints, holder))?;
        self.handle.block_on(write_history(&self.state, &self.output))
    }

    /// Exports `final/` (while this replica holds the job) and the history.
    fn finish(self) -> Result<Outcome, Error> {
        self.handle.block_on(self.jobs.confirm(&self.entry))?;
        self.handle.block_on(export(&self.model, &self.output.child("final")))?;
        self.handle.block_on(write_history(&self.state, &self.output))?;
        Ok(Outcome::Finished { steps: self.state.step, best: self.state.best })
    }
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
