//! Chat templates render in `starling template-worker` processes: the same text as a render
//! in this process, workers reused, and a template past its memory or time limit ends only its
//! own worker, with a `template_limit`-kind error, while the next render is served.

use std::time::{Duration, Instant};

use starling::gateway::template::sandbox::{Limits, RenderJob, TemplateSandbox};
use starling::gateway::template::{ChatMessage, TemplateError};

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
/// Doubles a list 40 times: MiniJinja keeps `l + l` lazy and uncharged, then materializes
/// every item at once 33 levels down (2^33 values), which no fuel limit stops.
const DOUBLING: &str = "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}\
{% endfor %}{{ ns.l|length }}";

fn job(template: Option<&str>) -> RenderJob {
    RenderJob {
        model: "m".into(),
        template: template.map(str::to_owned),
        messages: vec![
            ChatMessage { role: "system".into(), content: "Be brief.".into(), ..Default::default() },
            ChatMessage { role: "user".into(), content: "Hello, wörld".into(), ..Default::default() },
        ],
        bos_token: "<s>".into(),
        eos_token: "</s>".into(),
        tools: None,
    }
}

fn sandbox(memory_mib: u64, timeout: Duration, max_idle: usize) -> TemplateSandbox {
    TemplateSandbox::new(
        crate::support::starling_binary(),
        Limits { memory_bytes: memory_mib << 20, timeout },
        max_idle,
    )
}

/// At the smallest memory the config allows (64 MiB), a worker renders what this process
/// renders; a second render reuses the idle worker instead of starting another.
#[test]
fn a_worker_renders_what_this_process_renders_and_is_reused() {
    let s = sandbox(64, Duration::from_secs(10), 2);
    let good = job(Some(CHATML));
    let text = s.render(&good).unwrap();
    assert_eq!(text, good.render_here().unwrap());
    assert!(text.contains("wörld") && text.ends_with("<|im_start|>assistant\n"), "{text:?}");
    let first = s.idle_workers();
    assert_eq!(first.len(), 1);
    assert_eq!(s.render(&good).unwrap(), text);
    assert_eq!(s.idle_workers(), first, "the same worker served the second render");
}

/// A template's own errors cross the pipe as the same errors, and the worker stays, unless
/// the render was stopped by its budget.
#[test]
fn template_errors_come_back_unchanged() {
    let s = sandbox(256, Duration::from_secs(10), 1);
    let refusing = job(Some("{{ raise_exception('only user turns, please') }}"));
    match s.render(&refusing) {
        Err(TemplateError::Render(m)) => assert!(m.contains("only user turns, please"), "{m}"),
        other => panic!("expected a render error, got {other:?}"),
    }
    assert!(matches!(s.render(&job(None)), Err(TemplateError::Missing(m)) if m == "m"));
    assert!(matches!(s.render(&job(Some("{% for %}"))), Err(TemplateError::Compile(_))));
    assert_eq!(s.idle_workers().len(), 1, "errors inside a template do not end the worker");
    // A render stopped by its budget retires its worker (its heap may sit near the limit).
    let worker = s.idle_workers();
    let fuel = job(Some("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"));
    assert!(matches!(s.render(&fuel), Err(TemplateError::TooCostly(m)) if m.contains("work budget")));
    assert!(s.idle_workers().is_empty(), "the worker that ran out of budget is not kept");
    assert!(s.render(&job(Some(CHATML))).is_ok());
    assert_ne!(s.idle_workers(), worker);
}

/// The list-doubling template under 96 MiB: its worker dies of its memory limit, the error
/// says so, and the next render (in a fresh worker) is served.
#[test]
fn a_template_past_its_memory_ends_only_its_worker() {
    let s = sandbox(96, Duration::from_secs(30), 1);
    assert!(s.render(&job(Some(CHATML))).is_ok());
    let before = s.idle_workers();
    match s.render(&job(Some(DOUBLING))) {
        Err(TemplateError::TooCostly(m)) => assert!(m.contains("96 MiB of memory"), "{m}"),
        other => panic!("expected a memory limit error, got {other:?}"),
    }
    assert!(s.idle_workers().is_empty(), "the dead worker is not kept");
    assert_eq!(s.render(&job(Some(CHATML))).unwrap(), job(Some(CHATML)).render_here().unwrap());
    assert_ne!(s.idle_workers(), before, "a fresh worker serves after the death");
}

/// The same template under a 300 ms limit and ample memory is stopped by the alarm.
#[test]
fn a_template_past_its_time_is_stopped() {
    let s = sandbox(1024, Duration::from_millis(300), 1);
    let started = Instant::now();
    match s.render(&job(Some(DOUBLING))) {
        Err(TemplateError::TooCostly(m)) => assert!(m.contains("took longer than 300 ms"), "{m}"),
        other => panic!("expected a time limit error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5), "stopped after {:?}", started.elapsed());
    assert!(s.render(&job(Some(CHATML))).is_ok());
}

/// A worker killed from outside while idle is replaced at the next render.
#[test]
fn a_worker_killed_while_idle_is_replaced() {
    let s = sandbox(256, Duration::from_secs(10), 1);
    assert!(s.render(&job(Some(CHATML))).is_ok());
    let pid = s.idle_workers()[0];
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.render(&job(Some(CHATML))).unwrap(), job(Some(CHATML)).render_here().unwrap());
    assert_ne!(s.idle_workers(), [pid]);
}

/// A program that is not a template worker is refused at hello, with its path in the error.
#[test]
fn a_program_that_is_not_a_worker_is_named() {
    let s = TemplateSandbox::new(
        "/bin/true".into(),
        Limits { memory_bytes: 256 << 20, timeout: Duration::from_secs(1) },
        1,
    );
    match s.render(&job(Some(CHATML))) {
        Err(e @ TemplateError::Sandbox(_)) => {
            let m = e.to_string();
            assert!(m.contains("/bin/true") && m.contains("did not say hello"), "{m}");
        }
        other => panic!("expected a sandbox error, got {other:?}"),
    }
}

/// A worker runs in a process group of its own, so a terminal's Ctrl-C meant for `starling
/// chat` or a foreground server does not end it.
#[test]
fn a_worker_is_out_of_the_terminals_reach() {
    let s = sandbox(256, Duration::from_secs(10), 1);
    assert!(s.render(&job(Some(CHATML))).is_ok());
    let pid = s.idle_workers()[0];
    let group = |pid: &str| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // pid (comm) state ppid pgrp ...: the comm may hold spaces, so count from its `)`.
        stat.rsplit_once(')').unwrap().1.split_whitespace().nth(2).unwrap().to_owned()
    };
    assert_eq!(group(&pid.to_string()), pid.to_string(), "the worker leads its own group");
    assert_ne!(group("self"), pid.to_string());
}

/// A program that starts but never answers is given up on at the hello deadline (5 s) and
/// ended, with an error that says so, instead of holding the thread forever.
#[test]
fn a_worker_that_never_answers_is_given_up() {
    let script = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("silent-template-worker.sh");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 60\n").unwrap();
    std::process::Command::new("chmod").arg("+x").arg(&script).status().unwrap();
    let s = TemplateSandbox::new(script, Limits { memory_bytes: 256 << 20, timeout: Duration::from_millis(100) }, 1);
    let started = Instant::now();
    match s.render(&job(Some(CHATML))) {
        Err(e @ TemplateError::Sandbox(_)) => assert!(e.to_string().contains("stopped answering"), "{e}"),
        other => panic!("expected a sandbox error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(8), "gave up after {:?}", started.elapsed());
}
