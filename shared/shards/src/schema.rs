//! Arrow schemas of the two layouts.
//!
//! `triples` — one row per (query, positive, negative):
//!
//! | column | type | meaning |
//! |---|---|---|
//! | query_id, query | utf8 | the query |
//! | pos_id, pos_text | utf8 | the positive passage |
//! | pos_score | float64, null | teacher score of the positive (null: the teacher has none) |
//! | pos_label | int32, null | relevance grade from qrels / labels (null: unjudged) |
//! | neg_id, neg_text, neg_score, neg_label | | the same for the negative |
//! | pos_member_scores, neg_member_scores | list<float64>, null | each ensemble member's score, in the order of the teacher identity's `models` (null: not an ensemble) |
//!
//! `lists` — one row per query with its candidates in first-stage order:
//!
//! | column | type | meaning |
//! |---|---|---|
//! | query_id, query | utf8 | the query |
//! | doc_ids, doc_texts | list<utf8> | the candidates |
//! | teacher_scores | list<float64> | teacher score of each candidate |
//! | teacher_ranks | list<int32> | 1-based rank the teacher gives each candidate |
//! | labels | list<int32, null> | relevance grade (null: unjudged) |
//! | member_scores | list<list<float64>>, null | each candidate's ensemble member scores (null: not an ensemble) |
//!
//! The member-score columns are optional for readers: datasets written before them still read.
//! Both carry schema metadata `distill.layout`, `distill.format_version` and `distill.teacher` (the
//! teacher's identity as JSON), so a single shard is self-describing.

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::collections::HashMap;
use std::sync::Arc;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Triples,
    Lists,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Triples => "triples",
            Layout::Lists => "lists",
        }
    }
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "triples" => Ok(Layout::Triples),
            "lists" => Ok(Layout::Lists),
            other => Err(format!("unknown layout '{other}' (expected triples or lists)")),
        }
    }
}

/// Who produced the teacher scores: kind (`first_stage`, `precomputed`, ...), a name, and whatever
/// else identifies it (file, models, endpoint).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TeacherIdentity {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

fn list_of(item: DataType, nullable: bool) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, nullable)))
}

/// The columns of a layout, without metadata.
pub fn fields(layout: Layout) -> Vec<Field> {
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    match layout {
        Layout::Triples => vec![
            text("query_id"),
            text("query"),
            text("pos_id"),
            text("pos_text"),
            Field::new("pos_score", DataType::Float64, true),
            Field::new("pos_label", DataType::Int32, true),
            text("neg_id"),
            text("neg_text"),
            Field::new("neg_score", DataType::Float64, true),
            Field::new("neg_label", DataType::Int32, true),
            Field::new("pos_member_scores", list_of(DataType::Float64, false), true),
            Field::new("neg_member_scores", list_of(DataType::Float64, false), true),
        ],
        Layout::Lists => vec![
            text("query_id"),
            text("query"),
            Field::new("doc_ids", list_of(DataType::Utf8, false), false),
            Field::new("doc_texts", list_of(DataType::Utf8, false), false),
            Field::new("teacher_scores", list_of(DataType::Float64, false), false),
            Field::new("teacher_ranks", list_of(DataType::Int32, false), false),
            Field::new("labels", list_of(DataType::Int32, true), false),
            Field::new("member_scores", list_of(list_of(DataType::Float64, false), false), true),
        ],
    }
}

/// The full schema of a layout with the teacher's identity in its metadata.
pub fn schema(layout: Layout, teacher: &TeacherIdentity) -> SchemaRef {
    let metadata = HashMap::from([
        ("distill.layout".to_string(), layout.name().to_string()),
        ("distill.format_version".to_string(), FORMAT_VERSION.to_string()),
        ("distill.teacher".to_string(), serde_json::to_string(teacher).expect("identity serializes")),
    ]);
    Arc::new(Schema::new_with_metadata(fields(layout), metadata))
}

/// Columns a reader does without (added after the first datasets were written).
pub const OPTIONAL_COLUMNS: [&str; 3] = ["pos_member_scores", "neg_member_scores", "member_scores"];

/// Checks that `schema` has the columns and types of `layout` (metadata aside).
pub fn check(layout: Layout, schema: &Schema) -> Result<(), String> {
    for want in fields(layout) {
        match schema.field_with_name(want.name()) {
            Err(_) if OPTIONAL_COLUMNS.contains(&want.name().as_str()) => {}
            Err(_) => return Err(format!("missing column '{}' of the {} layout", want.name(), layout.name())),
            Ok(f) if f.data_type() != want.data_type() => {
                return Err(format!(
                    "column '{}' has type {}, the {} layout wants {}",
                    want.name(),
                    f.data_type(),
                    layout.name(),
                    want.data_type()
                ))
            }
            Ok(_) => {}
        }
    }
    Ok(())
}
