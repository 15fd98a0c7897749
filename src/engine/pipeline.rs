//! Pipeline files: the ordered list of tick stages, read from `pipelines/*.yaml`.
//!
//! The order is data. Parsing checks stage names, duplicates, that every required stage
//! is present, and that no stage runs before one it depends on.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A tick stage. Required stages must appear in every pipeline; optional ones only where named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Admit,
    Tokenize,
    InputPolicy,
    Batch,
    Forward,
    Constrain,
    Sample,
    OutputPolicy,
    Emit,
    Evict,
}

impl Stage {
    pub const ALL: [Stage; 10] = [
        Stage::Admit,
        Stage::Tokenize,
        Stage::InputPolicy,
        Stage::Batch,
        Stage::Forward,
        Stage::Constrain,
        Stage::Sample,
        Stage::OutputPolicy,
        Stage::Emit,
        Stage::Evict,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Admit => "admit",
            Stage::Tokenize => "tokenize",
            Stage::InputPolicy => "input_policy",
            Stage::Batch => "batch",
            Stage::Forward => "forward",
            Stage::Constrain => "constrain",
            Stage::Sample => "sample",
            Stage::OutputPolicy => "output_policy",
            Stage::Emit => "emit",
            Stage::Evict => "evict",
        }
    }

    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn is_optional(self) -> bool {
        matches!(self, Stage::InputPolicy | Stage::Constrain | Stage::OutputPolicy)
    }

    /// Stages that must run earlier in the same tick when both are present.
    pub fn after(self) -> &'static [Stage] {
        match self {
            Stage::Admit => &[],
            Stage::Tokenize => &[Stage::Admit],
            Stage::InputPolicy => &[Stage::Tokenize],
            Stage::Batch => &[Stage::Tokenize, Stage::InputPolicy],
            Stage::Forward => &[Stage::Batch],
            Stage::Constrain => &[Stage::Forward],
            Stage::Sample => &[Stage::Forward, Stage::Constrain],
            Stage::OutputPolicy => &[Stage::Sample],
            Stage::Emit => &[Stage::Sample, Stage::OutputPolicy],
            Stage::Evict => &[Stage::Admit],
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-stage parameters, checked against what each stage understands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageParams {
    /// `sample`: the default sampler order for requests that do not name one (step names
    /// are checked when the model loads: `engine::load::default_sampler_order`).
    pub sampler_order: Option<Vec<String>>,
}

/// One validated pipeline: stages in run order, each with its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineSpec {
    pub name: String,
    pub stages: Vec<(Stage, StageParams)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot read pipeline file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("pipeline file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("pipeline `{pipeline}`: unknown stage `{stage}` at stages[{index}] (known: {known})")]
    UnknownStage { pipeline: String, stage: String, index: usize, known: String },
    #[error("pipeline `{pipeline}`: stage `{stage}` appears twice (stages[{first}] and stages[{second}])")]
    Duplicate { pipeline: String, stage: Stage, first: usize, second: usize },
    #[error("pipeline `{pipeline}`: required stage `{stage}` is missing")]
    Missing { pipeline: String, stage: Stage },
    #[error("pipeline `{pipeline}`: stage `{stage}` at stages[{index}] must run after `{needs}`, which comes later")]
    Order { pipeline: String, stage: Stage, index: usize, needs: Stage },
    #[error("pipeline `{pipeline}`: stage `{stage}` does not take parameter `{param}`")]
    UnknownParam { pipeline: String, stage: Stage, param: String },
    #[error("pipeline `{pipeline}`: stage `{stage}` parameter `{param}`: {message}")]
    BadParam { pipeline: String, stage: Stage, param: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: Option<String>,
    stages: Vec<RawStage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    stage: String,
    #[serde(default)]
    params: BTreeMap<String, serde_json::Value>,
}

impl PipelineSpec {
    /// Reads and validates a pipeline file.
    pub fn load(path: &Path) -> Result<PipelineSpec, PipelineError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| PipelineError::Io { path: path.to_owned(), source })?;
        let fallback = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Self::parse(&text, &fallback).map_err(|e| match e {
            PipelineError::Syntax { message, .. } => PipelineError::Syntax { path: path.to_owned(), message },
            other => other,
        })
    }

    /// Parses pipeline YAML; `fallback_name` names it when the file has no `name`.
    pub fn parse(text: &str, fallback_name: &str) -> Result<PipelineSpec, PipelineError> {
        let raw: RawPipeline = serde_saphyr::from_str(text)
            .map_err(|e| PipelineError::Syntax { path: PathBuf::new(), message: e.to_string() })?;
        let pipeline = raw.name.unwrap_or_else(|| fallback_name.to_owned());
        let mut stages: Vec<(Stage, StageParams)> = Vec::with_capacity(raw.stages.len());
        for (index, rs) in raw.stages.into_iter().enumerate() {
            let stage = Stage::from_name(&rs.stage).ok_or_else(|| PipelineError::UnknownStage {
                pipeline: pipeline.clone(),
                stage: rs.stage.clone(),
                index,
                known: Stage::ALL.map(Stage::name).join(", "),
            })?;
            if let Some(first) = stages.iter().position(|(s, _)| *s == stage) {
                return Err(PipelineError::Duplicate { pipeline, stage, first, second: index });
            }
            let params = parse_params(&pipeline, stage, rs.params)?;
            stages.push((stage, params));
        }
        for stage in Stage::ALL.into_iter().filter(|s| !s.is_optional()) {
            if !stages.iter().any(|(s, _)| *s == stage) {
                return Err(PipelineError::Missing { pipeline, stage });
            }
        }
        for (index, (stage, _)) in stages.iter().enumerate() {
            for needs in stage.after() {
                if let Some(pos) = stages.iter().position(|(s, _)| s == needs)
                    && pos > index
                {
                    return Err(PipelineError::Order { pipeline, stage: *stage, index, needs: *needs });
                }
            }
        }
        Ok(PipelineSpec { name: pipeline, stages })
    }

    pub fn has(&self, stage: Stage) -> bool {
        self.stages.iter().any(|(s, _)| *s == stage)
    }

    pub fn params(&self, stage: Stage) -> Option<&StageParams> {
        self.stages.iter().find(|(s, _)| *s == stage).map(|(_, p)| p)
    }

    /// The stages every pipeline needs, in their natural order.
    pub fn default_spec() -> PipelineSpec {
        // As pipelines/default.yaml: the required stages and `constrain`.
        let stages = Stage::ALL
            .into_iter()
            .filter(|s| !s.is_optional() || *s == Stage::Constrain)
            .map(|s| (s, StageParams::default()))
            .collect();
        PipelineSpec { name: "default".into(), stages }
    }
}

fn parse_params(
    pipeline: &str,
    stage: Stage,
    raw: BTreeMap<String, serde_json::Value>,
) -> Result<StageParams, PipelineError> {
    let mut params = StageParams::default();
    for (param, value) in raw {
        let bad = |message: &str| PipelineError::BadParam {
            pipeline: pipeline.to_owned(),
            stage,
            param: param.clone(),
            message: message.to_owned(),
        };
        match (stage, param.as_str()) {
            (Stage::Sample, "samplers") => {
                let list = value.as_array().ok_or_else(|| bad("must be a list of sampler step names"))?;
                let names = list
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| bad("must be a list of strings")))
                    .collect::<Result<Vec<_>, _>>()?;
                params.sampler_order = Some(names);
            }
            _ => return Err(PipelineError::UnknownParam { pipeline: pipeline.to_owned(), stage, param }),
        }
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = include_str!("../../pipelines/default.yaml");

    fn parse(text: &str) -> Result<PipelineSpec, PipelineError> {
        PipelineSpec::parse(text, "test")
    }

    #[test]
    fn default_file_lists_the_core_stages_in_order() {
        let spec = parse(DEFAULT).unwrap();
        let names: Vec<_> = spec.stages.iter().map(|(s, _)| s.name()).collect();
        assert_eq!(names, ["admit", "tokenize", "batch", "forward", "constrain", "sample", "emit", "evict"]);
        assert_eq!(spec, PipelineSpec { name: "default".into(), ..spec.clone() });
    }

    #[test]
    fn unknown_stage_is_named_with_its_index() {
        let err = parse("stages: [{stage: admit}, {stage: teleport}]").unwrap_err();
        assert!(matches!(err, PipelineError::UnknownStage { ref stage, index: 1, .. } if stage == "teleport"));
        assert!(err.to_string().contains("unknown stage `teleport` at stages[1]"), "{err}");
    }

    #[test]
    fn duplicate_stage_is_rejected() {
        let text = "stages: [{stage: admit}, {stage: tokenize}, {stage: admit}]";
        let err = parse(text).unwrap_err();
        assert!(matches!(err, PipelineError::Duplicate { stage: Stage::Admit, first: 0, second: 2, .. }), "{err}");
    }

    #[test]
    fn missing_required_stage_is_rejected() {
        let text = "stages: [{stage: admit}, {stage: tokenize}, {stage: batch}, {stage: forward}, {stage: sample}, {stage: emit}]";
        let err = parse(text).unwrap_err();
        assert!(matches!(err, PipelineError::Missing { stage: Stage::Evict, .. }), "{err}");
    }

    #[test]
    fn sample_before_forward_breaks_a_dependency() {
        let text = "stages: [{stage: admit}, {stage: tokenize}, {stage: batch}, {stage: sample}, {stage: forward}, {stage: emit}, {stage: evict}]";
        let err = parse(text).unwrap_err();
        assert!(matches!(err, PipelineError::Order { stage: Stage::Sample, needs: Stage::Forward, index: 3, .. }));
        assert!(err.to_string().contains("`sample` at stages[3] must run after `forward`"), "{err}");
    }

    #[test]
    fn optional_stage_must_respect_its_place() {
        let text = "stages: [{stage: admit}, {stage: tokenize}, {stage: batch}, {stage: input_policy}, {stage: forward}, {stage: sample}, {stage: emit}, {stage: evict}]";
        let err = parse(text).unwrap_err();
        assert!(matches!(err, PipelineError::Order { stage: Stage::Batch, needs: Stage::InputPolicy, .. }), "{err}");
    }

    #[test]
    fn reordered_and_extra_stages_keep_file_order() {
        let text = "name: custom\nstages: [{stage: admit}, {stage: evict}, {stage: tokenize}, {stage: input_policy}, {stage: batch}, {stage: forward}, {stage: sample}, {stage: output_policy}, {stage: emit}]";
        let spec = parse(text).unwrap();
        let names: Vec<_> = spec.stages.iter().map(|(s, _)| s.name()).collect();
        let want =
            ["admit", "evict", "tokenize", "input_policy", "batch", "forward", "sample", "output_policy", "emit"];
        assert_eq!(names, want);
        assert_eq!(spec.name, "custom");
    }

    #[test]
    fn params_are_checked_per_stage() {
        let ok = "stages: [{stage: admit}, {stage: tokenize}, {stage: batch}, {stage: forward}, {stage: sample, params: {samplers: [top_k, temperature]}}, {stage: emit}, {stage: evict}]";
        let spec = parse(ok).unwrap();
        assert_eq!(
            spec.params(Stage::Sample).unwrap().sampler_order.as_deref(),
            Some(&["top_k".to_string(), "temperature".to_string()][..])
        );

        let bad = ok.replace("samplers: [top_k, temperature]", "samplers: 3");
        let err = parse(&bad).unwrap_err();
        assert!(err.to_string().contains("`samplers`: must be a list of sampler step names"), "{err}");

        let elsewhere = ok.replace("{stage: evict}", "{stage: evict, params: {samplers: [top_k]}}");
        assert!(matches!(parse(&elsewhere).unwrap_err(), PipelineError::UnknownParam { stage: Stage::Evict, .. }));
        let unknown = ok.replace("samplers:", "samplerz:");
        assert!(matches!(parse(&unknown).unwrap_err(), PipelineError::UnknownParam { stage: Stage::Sample, .. }));
    }

    #[test]
    fn unknown_top_level_field_is_a_syntax_error() {
        let err = parse("stagez: []").unwrap_err();
        assert!(matches!(err, PipelineError::Syntax { .. }), "{err}");
        assert!(err.to_string().contains("stagez"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = PipelineSpec::load(Path::new("/nonexistent/pipe.yaml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/pipe.yaml"), "{err}");
    }
}
