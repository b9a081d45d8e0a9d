//! The trainer service (issue 5). Built so far: the training objectives.

pub mod objectives;
