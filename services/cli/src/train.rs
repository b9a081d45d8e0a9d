//! `distill train`: its arguments and the training spec they make.

use crate::evaluate::EvalSource;
use clap::ValueEnum;
use distill_proto as pb;
use distill_store::absolutize;

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum ScheduleArg {
    Linear,
    Cosine,
    Constant,
}

/// The training flags besides the learning rate and the seed (which a sweep varies).
#[derive(clap::Args, Debug, Clone)]
pub struct HyperArgs {
    #[arg(long, default_value_t = 8)]
    pub batch_size: u32,
    /// Passages per query (lists layout).
    #[arg(long, default_value_t = 8)]
    pub group_size: u32,
    /// Optimizer steps (0: --epochs passes over the data).
    #[arg(long, default_value_t = 0)]
    pub max_steps: u64,
    #[arg(long, default_value_t = 1)]
    pub epochs: u32,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    #[arg(long, value_enum, default_value = "linear")]
    pub schedule: ScheduleArg,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Clip gradients to this global norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1)]
    pub accumulation: u32,
    #[arg(long, default_value_t = 32)]
    pub max_query_length: u32,
    #[arg(long, default_value_t = 256)]
    pub max_length: u32,
    /// Temperature of infonce / kl_div / adr_mse.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1024)]
    pub shuffle_buffer: u32,
    /// fp32, or bf16: mixed precision (bf16 matmuls, f32 master weights and optimizer state), for GPUs.
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16"])]
    pub precision: String,
}

impl HyperArgs {
    /// The hyperparameters of a job with learning rate `lr` and seed `seed`.
    pub fn with(&self, lr: f64, seed: u64) -> pb::Hyperparameters {
        pb::Hyperparameters {
            learning_rate: lr,
            batch_size: self.batch_size,
            group_size: self.group_size,
            max_steps: self.max_steps,
            epochs: self.epochs,
            warmup_steps: self.warmup_steps,
            schedule: match self.schedule {
                ScheduleArg::Linear => pb::LrSchedule::Linear,
                ScheduleArg::Cosine => pb::LrSchedule::Cosine,
                ScheduleArg::Constant => pb::LrSchedule::Constant,
            } as i32,
            weight_decay: Some(self.weight_decay),
            max_grad_norm: Some(self.max_grad_norm),
            gradient_accumulation: self.accumulation,
            seed,
            max_query_length: self.max_query_length,
            max_length: self.max_length,
            temperature: self.temperature,
            shuffle_buffer: self.shuffle_buffer,
            precision: self.precision.clone(),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Committed dataset (repeat for several): a path or object-store URL.
    #[arg(long = "dataset", required_unless_present = "teacher_job")]
    pub datasets: Vec<String>,
    /// Instead of --dataset: follow this labelling job of the teacher service (--teacher) while it
    /// runs, training on its shards as they are written (needs --max-steps).
    #[arg(long, conflicts_with = "datasets")]
    pub teacher_job: Option<String>,
    /// The student's starting weights: a Hugging Face model directory or object-store prefix.
    #[arg(long)]
    pub backbone: String,
    /// Keep only the backbone's first N encoder layers (0: all).
    #[arg(long, default_value_t = 0)]
    pub backbone_layers: u32,
    /// Keep the word embeddings as the backbone has them (no gradient, no update).
    #[arg(long)]
    pub freeze_word_embeddings: bool,
    /// bce, hinge, infonce, margin_mse, distill_ranknet, adr_mse, mse, ranknet, kl_div.
    #[arg(long)]
    pub objective: String,
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub hyper: HyperArgs,
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Evaluate every N steps (and at the end) on --eval-run; 0: only at the end.
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    #[command(flatten)]
    pub eval: EvalSource,
    /// The metric that picks the best model (default: the first of --metrics).
    #[arg(long, default_value = "")]
    pub validation_metric: String,
    /// Checkpoints, metrics and exports go to --output.
    #[command(flatten)]
    pub job: crate::jobs::JobArgs,
}

pub fn training_spec(a: &TrainArgs, teacher_addr: &str) -> pb::TrainingSpec {
    pb::TrainingSpec {
        teacher_job: a
            .teacher_job
            .as_ref()
            .map(|id| pb::TeacherJobRef { address: teacher_addr.to_string(), job_id: id.clone() }),
        datasets: a.datasets.iter().map(|d| absolutize(d)).collect(),
        backbone: absolutize(&a.backbone),
        backbone_layers: a.backbone_layers,
        freeze_word_embeddings: a.freeze_word_embeddings,
        objective: a.objective.clone(),
        hyperparameters: Some(a.hyper.with(a.lr, a.seed)),
        evaluation: a.eval.spec("", a.hyper.max_query_length, a.hyper.max_length, "", ""),
        eval_every_steps: a.eval_every,
        validation_metric: a.validation_metric.clone(),
        checkpoint_every_steps: a.checkpoint_every,
        output_uri: absolutize(&a.job.output),
        name: a.job.name.clone(),
    }
}

/// `distill train`: starts the job and follows it.
pub async fn run(args: &TrainArgs, conn: &crate::client::Connection) -> anyhow::Result<()> {
    let mut client = conn.trainer().await?;
    let job = client.start_training(training_spec(args, &conn.teacher_addr)).await?.into_inner();
    crate::jobs::follow(&mut client, job, "training", args.job.detach).await
}
