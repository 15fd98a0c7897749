//! `starling serve`: bind, load the configured models on a blocking task, serve HTTP until
//! a signal (or a failed load) stops it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use starling::config::{Config, LogFormat, Overrides};
use starling::gateway::{AppState, load_configured, mark_configured_loading, serve};
use starling::telemetry::{self, LogStyle, Observability};

#[derive(Args)]
pub struct ServeArgs {
    /// Config file (YAML, or JSON by extension).
    #[arg(long, default_value = "config/starling.yaml")]
    config: PathBuf,
    /// Address to listen on (overrides the config and STARLING_BIND).
    #[arg(long, value_name = "HOST:PORT")]
    bind: Option<String>,
    /// GGUF model for the first configured model slot: a file, or a model name
    /// (`starling models pull NAME` fetches it).
    #[arg(long)]
    model: Option<String>,
}

/// Runs the server; `style` and `trace` are the global flags (the config fills what they leave).
pub fn run(args: ServeArgs, style: Option<LogStyle>, trace: Option<PathBuf>) -> Result<()> {
    let model = args.model.as_deref().map(super::catalog::resolve).transpose()?;
    let overrides = Overrides { bind: args.bind, model, ..Default::default() }.or(Overrides::from_env());
    let config = Config::load_with_overrides(&args.config, &overrides)?;
    let style = style.unwrap_or(match config.telemetry.log_format {
        LogFormat::Json => LogStyle::Json,
        LogFormat::Text => LogStyle::Text,
    });
    let trace = trace.or(config.telemetry.trace_chrome.clone());
    let _guard = telemetry::init(style, &config.telemetry.log_level, trace.as_deref())?;
    let obs = Arc::new(Observability::new()?);
    let bind = config.server.bind;
    let state = Arc::new(AppState::new(Arc::new(config), Vec::new(), obs).with_config_source(args.config, overrides));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    mark_configured_loading(&state);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| format!("cannot listen on {bind}"))?;
        tracing::info!(addr = %listener.local_addr()?, "listening");
        let failure = Arc::new(std::sync::Mutex::new(None));
        let stop = stop_on_signal_or_load_failure(state.clone(), failure.clone());
        serve(listener, state, stop).await;
        match failure.lock().map(|mut f| f.take()) {
            Ok(Some(e)) => Err(e),
            _ => anyhow::Ok(()),
        }
    })?;
    tracing::info!("stopped");
    Ok(())
}

/// Loads the configured models on a blocking task (the server is already listening and
/// answers `/readyz` with 503 "model loading"); resolves on a shutdown signal, or when a
/// load fails, after putting the error in `failure` so `serve` exits non-zero.
async fn stop_on_signal_or_load_failure(state: Arc<AppState>, failure: Arc<std::sync::Mutex<Option<anyhow::Error>>>) {
    let loading = tokio::task::spawn_blocking(move || load_configured(&state));
    let failed = async move {
        let error = match loading.await {
            Ok(Ok(())) => return std::future::pending().await,
            Ok(Err(e)) => anyhow::Error::new(e),
            Err(e) => anyhow::anyhow!("the model loader stopped: {e}"),
        };
        tracing::error!(error = %error, "model load failed; stopping");
        if let Ok(mut f) = failure.lock() {
            *f = Some(error);
        }
    };
    tokio::select! {
        () = shutdown_signal() => {}
        () = failed => {}
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}
