//! The optional content-policy stages (`input_policy`, `output_policy`).

use bevy_ecs::prelude::*;

use crate::engine::components::*;
use crate::engine::resources::*;
use crate::error::{ApiError, ErrorKind};
use crate::sampler::TextGate;
use crate::types::TenantId;

fn applies(tenants: &Option<Vec<TenantId>>, tenant: &TenantId) -> bool {
    tenants.as_ref().is_none_or(|list| list.contains(tenant))
}

/// Refuses newly tokenized prompts that match an input rule for their tenant, before any
/// forward pass sees them (400 `content_policy`).
pub fn check_input_policy(
    mut seqs: Query<(&Tokens, &Tenant, &mut Phase, &mut Outbox), Added<Tokens>>,
    policies: Res<Policies>,
    tokenizer: Res<TokenizerRes>,
) {
    for (tokens, tenant, mut phase, mut outbox) in &mut seqs {
        if *phase != Phase::Queued {
            continue;
        }
        let rules: Vec<_> = policies.input.iter().filter(|(t, _)| applies(t, &tenant.0)).collect();
        if rules.is_empty() {
            continue;
        }
        let text = match tokenizer.0.decode(&tokens.ids, false) {
            Ok(text) => text,
            Err(e) => {
                fail(&mut phase, &mut outbox, ApiError::new(ErrorKind::InvalidRequest, e.to_string()));
                continue;
            }
        };
        if let Some(err) = rules.iter().find_map(|(_, r)| r.check_input(&text).err()) {
            fail(&mut phase, &mut outbox, err);
        }
    }
}

/// Attaches the tenant's output rules to new requests' text gates, so emit stops a
/// generation that produces a match (`content_filter`) without streaming the match.
pub fn check_output_policy(
    mut seqs: Query<(&Tenant, &Sampling, &mut TextOut), Added<Tenant>>,
    policies: Res<Policies>,
) {
    for (tenant, sampling, mut text_out) in &mut seqs {
        if let Some((_, rules)) = policies.output.iter().find(|(t, _)| applies(t, &tenant.0)) {
            text_out.gate = TextGate::new(&sampling.0.config().stop, Some(rules.clone()));
        }
    }
}
