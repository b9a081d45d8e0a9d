//! Typed rows of the two layouts and their conversion to and from Arrow record batches.

use crate::schema::{self, Layout};
use arrow::array::{Array, ArrayRef, AsArray, Float64Builder, Int32Builder, ListBuilder, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Float64Type, Int32Type, SchemaRef};
use std::sync::Arc;

/// One row of the `triples` layout.
#[derive(Debug, Clone, PartialEq)]
pub struct TripleRow {
    pub query_id: String,
    pub query: String,
    pub pos_id: String,
    pub pos_text: String,
    pub pos_score: Option<f64>,
    pub pos_label: Option<i32>,
    pub neg_id: String,
    pub neg_text: String,
    pub neg_score: Option<f64>,
    pub neg_label: Option<i32>,
    /// Each ensemble member's score (None: the teacher is not an ensemble).
    pub pos_member_scores: Option<Vec<f64>>,
    pub neg_member_scores: Option<Vec<f64>>,
}

/// One candidate of a `lists` row.
#[derive(Debug, Clone, PartialEq)]
pub struct ListItem {
    pub doc_id: String,
    pub text: String,
    pub teacher_score: f64,
    /// 1-based.
    pub teacher_rank: i32,
    pub label: Option<i32>,
    /// Each ensemble member's score (None: the teacher is not an ensemble).
    pub member_scores: Option<Vec<f64>>,
}

/// One row of the `lists` layout.
#[derive(Debug, Clone, PartialEq)]
pub struct ListRow {
    pub query_id: String,
    pub query: String,
    pub items: Vec<ListItem>,
}

/// Rows of either layout, buffered until they become a record batch.
#[derive(Debug, Clone)]
pub enum Rows {
    Triples(Vec<TripleRow>),
    Lists(Vec<ListRow>),
}

impl Rows {
    pub fn new(layout: Layout) -> Self {
        match layout {
            Layout::Triples => Rows::Triples(Vec::new()),
            Layout::Lists => Rows::Lists(Vec::new()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Rows::Triples(r) => r.len(),
            Rows::Lists(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn layout(&self) -> Layout {
        match self {
            Rows::Triples(_) => Layout::Triples,
            Rows::Lists(_) => Layout::Lists,
        }
    }

    /// Takes the buffered rows as one record batch with `schema` (which carries the metadata).
    pub fn take_batch(&mut self, schema: &SchemaRef) -> RecordBatch {
        let columns = match std::mem::replace(self, Rows::new(self.layout())) {
            Rows::Triples(rows) => triple_columns(&rows),
            Rows::Lists(rows) => list_columns(&rows),
        };
        RecordBatch::try_new(schema.clone(), columns).expect("columns follow the layout's schema")
    }
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    let mut b = StringBuilder::new();
    for v in values {
        b.append_value(v);
    }
    Arc::new(b.finish())
}

fn floats(values: impl Iterator<Item = Option<f64>>) -> ArrayRef {
    let mut b = Float64Builder::new();
    b.extend(values);
    Arc::new(b.finish())
}

fn ints(values: impl Iterator<Item = Option<i32>>) -> ArrayRef {
    let mut b = Int32Builder::new();
    b.extend(values);
    Arc::new(b.finish())
}

fn triple_columns(rows: &[TripleRow]) -> Vec<ArrayRef> {
    vec![
        strings(rows.iter().map(|r| r.query_id.as_str())),
        strings(rows.iter().map(|r| r.query.as_str())),
        strings(rows.iter().map(|r| r.pos_id.as_str())),
        strings(rows.iter().map(|r| r.pos_text.as_str())),
        floats(rows.iter().map(|r| r.pos_score)),
        ints(rows.iter().map(|r| r.pos_label)),
        strings(rows.iter().map(|r| r.neg_id.as_str())),
        strings(rows.iter().map(|r| r.neg_text.as_str())),
        floats(rows.iter().map(|r| r.neg_score)),
        ints(rows.iter().map(|r| r.neg_label)),
        float_lists(rows.iter().map(|r| r.pos_member_scores.as_deref()), "pos_member_scores"),
        float_lists(rows.iter().map(|r| r.neg_member_scores.as_deref()), "neg_member_scores"),
    ]
}

fn float_lists<'a>(values: impl Iterator<Item = Option<&'a [f64]>>, name: &str) -> ArrayRef {
    let fields = schema::fields(Layout::Triples);
    let mut b = ListBuilder::new(Float64Builder::new()).with_field(list_field(&fields, name));
    for v in values {
        match v {
            Some(v) => {
                b.values().append_slice(v);
                b.append(true);
            }
            None => b.append(false),
        }
    }
    Arc::new(b.finish())
}

fn list_field(layout_fields: &[Field], name: &str) -> Arc<Field> {
    match layout_fields.iter().find(|f| f.name() == name).map(|f| f.data_type()) {
        Some(DataType::List(item)) => item.clone(),
        _ => unreachable!("{name} is a list column"),
    }
}

fn list_columns(rows: &[ListRow]) -> Vec<ArrayRef> {
    let fields = schema::fields(Layout::Lists);
    let mut ids = ListBuilder::new(StringBuilder::new()).with_field(list_field(&fields, "doc_ids"));
    let mut texts = ListBuilder::new(StringBuilder::new()).with_field(list_field(&fields, "doc_texts"));
    let mut scores = ListBuilder::new(Float64Builder::new()).with_field(list_field(&fields, "teacher_scores"));
    let mut ranks = ListBuilder::new(Int32Builder::new()).with_field(list_field(&fields, "teacher_ranks"));
    let mut labels = ListBuilder::new(Int32Builder::new()).with_field(list_field(&fields, "labels"));
    let member_item = match list_field(&fields, "member_scores").data_type() {
        DataType::List(inner) => inner.clone(),
        _ => unreachable!("member_scores is a list of lists"),
    };
    let mut members = ListBuilder::new(ListBuilder::new(Float64Builder::new()).with_field(member_item))
        .with_field(list_field(&fields, "member_scores"));
    for row in rows {
        let has_members = row.items.iter().all(|i| i.member_scores.is_some()) && !row.items.is_empty();
        if has_members {
            for item in &row.items {
                members.values().values().append_slice(item.member_scores.as_deref().unwrap_or_default());
                members.values().append(true);
            }
        }
        members.append(has_members);
        for item in &row.items {
            ids.values().append_value(&item.doc_id);
            texts.values().append_value(&item.text);
            scores.values().append_value(item.teacher_score);
            ranks.values().append_value(item.teacher_rank);
            labels.values().append_option(item.label);
        }
        ids.append(true);
        texts.append(true);
        scores.append(true);
        ranks.append(true);
        labels.append(true);
    }
    vec![
        strings(rows.iter().map(|r| r.query_id.as_str())),
        strings(rows.iter().map(|r| r.query.as_str())),
        Arc::new(ids.finish()),
        Arc::new(texts.finish()),
        Arc::new(scores.finish()),
        Arc::new(ranks.finish()),
        Arc::new(labels.finish()),
        Arc::new(members.finish()),
    ]
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, String> {
    batch.column_by_name(name).ok_or_else(|| format!("missing column '{name}'"))
}

fn str_col<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a arrow::array::StringArray, String> {
    column(batch, name)?.as_string_opt::<i32>().ok_or_else(|| format!("column '{name}' is not utf8"))
}

fn f64_col<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a arrow::array::Float64Array, String> {
    column(batch, name)?.as_primitive_opt::<Float64Type>().ok_or_else(|| format!("column '{name}' is not float64"))
}

fn i32_col<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a arrow::array::Int32Array, String> {
    column(batch, name)?.as_primitive_opt::<Int32Type>().ok_or_else(|| format!("column '{name}' is not int32"))
}

fn opt<T: Copy>(valid: bool, v: T) -> Option<T> {
    valid.then_some(v)
}

/// An optional `list<float64>` column: per row, the list or None (column absent or null).
fn member_col(batch: &RecordBatch, name: &str) -> Result<Vec<Option<Vec<f64>>>, String> {
    let Some(col) = batch.column_by_name(name) else {
        return Ok(vec![None; batch.num_rows()]);
    };
    let list = col.as_list_opt::<i32>().ok_or_else(|| format!("column '{name}' is not a list"))?;
    Ok((0..batch.num_rows())
        .map(|i| list.is_valid(i).then(|| list.value(i).as_primitive::<Float64Type>().values().to_vec()))
        .collect())
}

impl TripleRow {
    /// Rough size in bytes once written.
    pub fn estimated_bytes(&self) -> usize {
        40 + self.query_id.len()
            + self.query.len()
            + self.pos_id.len()
            + self.pos_text.len()
            + self.neg_id.len()
            + self.neg_text.len()
            + 8 * (self.pos_member_scores.as_ref().map_or(0, Vec::len)
                + self.neg_member_scores.as_ref().map_or(0, Vec::len))
    }

    /// Decodes a `triples` record batch.
    pub fn from_batch(batch: &RecordBatch) -> Result<Vec<TripleRow>, String> {
        let (qid, q) = (str_col(batch, "query_id")?, str_col(batch, "query")?);
        let (pid, pt, ps, pl) = (
            str_col(batch, "pos_id")?,
            str_col(batch, "pos_text")?,
            f64_col(batch, "pos_score")?,
            i32_col(batch, "pos_label")?,
        );
        let (nid, nt, ns, nl) = (
            str_col(batch, "neg_id")?,
            str_col(batch, "neg_text")?,
            f64_col(batch, "neg_score")?,
            i32_col(batch, "neg_label")?,
        );
        let (pm, nm) = (member_col(batch, "pos_member_scores")?, member_col(batch, "neg_member_scores")?);
        Ok((0..batch.num_rows())
            .map(|i| TripleRow {
                query_id: qid.value(i).to_string(),
                query: q.value(i).to_string(),
                pos_id: pid.value(i).to_string(),
                pos_text: pt.value(i).to_string(),
                pos_score: opt(ps.is_valid(i), ps.value(i)),
                pos_label: opt(pl.is_valid(i), pl.value(i)),
                neg_id: nid.value(i).to_string(),
                neg_text: nt.value(i).to_string(),
                neg_score: opt(ns.is_valid(i), ns.value(i)),
                neg_label: opt(nl.is_valid(i), nl.value(i)),
                pos_member_scores: pm[i].clone(),
                neg_member_scores: nm[i].clone(),
            })
            .collect())
    }
}

impl ListRow {
    /// Rough size in bytes once written.
    pub fn estimated_bytes(&self) -> usize {
        16 + self.query_id.len()
            + self.query.len()
            + self
                .items
                .iter()
                .map(|i| 20 + i.doc_id.len() + i.text.len() + 8 * i.member_scores.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }

    /// Decodes a `lists` record batch.
    pub fn from_batch(batch: &RecordBatch) -> Result<Vec<ListRow>, String> {
        let (qid, q) = (str_col(batch, "query_id")?, str_col(batch, "query")?);
        let list = |name: &str| -> Result<&arrow::array::ListArray, String> {
            column(batch, name)?.as_list_opt::<i32>().ok_or_else(|| format!("column '{name}' is not a list"))
        };
        let (ids, texts, scores, ranks, labels) =
            (list("doc_ids")?, list("doc_texts")?, list("teacher_scores")?, list("teacher_ranks")?, list("labels")?);
        let members = match batch.column_by_name("member_scores") {
            Some(c) => Some(c.as_list_opt::<i32>().ok_or("column 'member_scores' is not a list")?),
            None => None,
        };
        let mut out = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let row_members: Option<Vec<Vec<f64>>> = match members {
                Some(m) if m.is_valid(i) => {
                    let per_item = m.value(i);
                    let per_item =
                        per_item.as_list_opt::<i32>().ok_or("column 'member_scores' is not a list of lists")?;
                    Some(
                        (0..per_item.len())
                            .map(|j| per_item.value(j).as_primitive::<Float64Type>().values().to_vec())
                            .collect(),
                    )
                }
                _ => None,
            };
            let id = ids.value(i);
            let id = id.as_string::<i32>();
            let text = texts.value(i);
            let text = text.as_string::<i32>();
            let score = scores.value(i);
            let score = score.as_primitive::<Float64Type>();
            let rank = ranks.value(i);
            let rank = rank.as_primitive::<Int32Type>();
            let label = labels.value(i);
            let label = label.as_primitive::<Int32Type>();
            let n = id.len();
            if [text.len(), score.len(), rank.len(), label.len()].iter().any(|&l| l != n)
                || row_members.as_ref().is_some_and(|m| m.len() != n)
            {
                return Err(format!("row {i}: list columns have different lengths"));
            }
            out.push(ListRow {
                query_id: qid.value(i).to_string(),
                query: q.value(i).to_string(),
                items: (0..n)
                    .map(|j| ListItem {
                        doc_id: id.value(j).to_string(),
                        text: text.value(j).to_string(),
                        teacher_score: score.value(j),
                        teacher_rank: rank.value(j),
                        label: opt(label.is_valid(j), label.value(j)),
                        member_scores: row_members.as_ref().map(|m| m[j].clone()),
                    })
                    .collect(),
            });
        }
        Ok(out)
    }
}
