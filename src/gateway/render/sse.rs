//! Server-Sent Events: a request's event channel turned into a streaming body.
//!
//! Each engine event is rendered to zero or more SSE frames by a route-specific renderer
//! (native or OpenAI shapes). While no event arrives, a comment line keeps the connection
//! alive. Dropping the body (the client left) drops the receiver, which the engine sees as
//! a cancellation.

use std::convert::Infallible;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

use super::Body;
use crate::error::{ApiError, ErrorKind};
use crate::gateway::service::Submission;
use crate::protocol::StreamEvent;

/// Turns one event into SSE text; `true` ends the stream after it.
pub trait Render: Send + Sync + 'static {
    fn render(&mut self, event: StreamEvent) -> (String, bool);
}

/// One SSE frame with an event name and a JSON payload.
pub fn frame(event: Option<&str>, data: &str) -> String {
    match event {
        Some(name) => format!("event: {name}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

struct State<R> {
    sub: Submission,
    render: R,
    keepalive: Duration,
    done: bool,
}

/// What woke the stream up.
enum Wake {
    Event(Option<StreamEvent>),
    Idle,
    Cancelled,
}

/// A `text/event-stream` response fed by the submission's events until the renderer says
/// the stream is over, or shutdown cancels it (then a final error event is sent).
pub fn response<R: Render>(sub: Submission, render: R, keepalive: Duration) -> Response<Body> {
    let state = State { sub, render, keepalive, done: false };
    let frames = stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let wake = tokio::select! {
            event = tokio::time::timeout(s.keepalive, s.sub.rx.recv()) => event.map_or(Wake::Idle, Wake::Event),
            Ok(()) = s.sub.cancel.wait_for(|c| *c).map(|r| r.map(|_| ())) => Wake::Cancelled,
        };
        let text = match wake {
            Wake::Idle => ": keep-alive\n\n".to_owned(),
            Wake::Event(Some(event)) => {
                s.sub.meter(&event);
                let (text, end) = s.render.render(event);
                s.done = end;
                text
            }
            Wake::Event(None) => {
                s.done = true;
                let lost = ApiError::new(ErrorKind::Internal, "the engine ended the stream without a final event");
                s.render.render(StreamEvent::Error(lost)).0
            }
            Wake::Cancelled => {
                s.done = true;
                let stop =
                    ApiError::new(ErrorKind::Unavailable, "the server is shutting down; the request was cancelled")
                        .with_code("shutdown");
                s.render.render(StreamEvent::Error(stop)).0
            }
        };
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(text))), s))
    });
    let mut r = Response::new(StreamBody::new(frames).boxed());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
