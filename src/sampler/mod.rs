//! Placeholder until the sampler branch lands (replaced wholesale by it).

/// Validated sampling parameters.
#[derive(Clone, Debug)]
pub struct SamplingConfig {
    pub seed: u64,
    pub max_tokens: u32,
}
