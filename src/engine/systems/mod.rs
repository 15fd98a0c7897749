//! The tick's stages, one file each; each a plain function over queries and resources.
//! `engine::runner::build_schedule` strings them together in the order the pipeline file gives.

mod admit;
mod batch;
mod constrain;
mod emit;
mod evict;
mod forward;
mod policy;
mod sample;
mod tokenize;

pub use admit::admit_requests;
pub use batch::assemble_batch;
pub use constrain::constrain_logits;
pub use emit::emit_events;
pub use evict::evict_finished;
pub use forward::run_forward;
pub use policy::{check_input_policy, check_output_policy};
pub use sample::sample_next_tokens;
pub use tokenize::tokenize_prompts;
