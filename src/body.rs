//! The body types on the proxy path. They stream: nothing here buffers a body.

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// What the gateway answers with: the upstream's streamed body, or a small body of its own.
#[derive(Debug)]
pub enum ResponseBody {
    Upstream(ProxiedBody),
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody::Full(Some(bytes.into()))
    }

    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream(body) => {
                let polled = Pin::new(&mut body.inner).poll_frame(cx);
                if let (Some(line), Poll::Ready(Some(Ok(frame)))) = (&mut body.line, &polled) {
                    if let Some(data) = frame.data_ref() {
                        line.count(data.len());
                    }
                }
                polled
            }
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(body) => body.inner.is_end_stream(),
            ResponseBody::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(body) => body.inner.size_hint(),
            ResponseBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// The upstream's body on its way to the client, with the request's access-log line when it
/// has one: the body counts its bytes into the line, and writes the line when it ends or is
/// dropped. The line is one pointer (from a per-thread stock, not allocated), so the body
/// stays about as small as the upstream's own, and it is put in place, never moved.
#[derive(Debug)]
pub struct ProxiedBody {
    inner: crate::pipeline::forward::UpstreamBody,
    pub(crate) line: Option<crate::access_log::Pending>,
}

impl ProxiedBody {
    /// The upstream's body, with no line yet.
    pub fn new(inner: crate::pipeline::forward::UpstreamBody) -> Self {
        ProxiedBody { inner, line: None }
    }
}

impl Drop for ProxiedBody {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            line.end();
        }
    }
}

/// The client's request body on its way upstream, cut off once it passes the route's limit.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    remaining: u64,
    /// Counts the body in its connection's activity until it ends.
    in_flight: Option<crate::pipeline::BodyInFlight>,
}

impl RequestBody {
    pub fn new(
        inner: Incoming,
        limit: u64,
        in_flight: Option<crate::pipeline::BodyInFlight>,
    ) -> Self {
        RequestBody {
            inner,
            remaining: limit,
            in_flight,
        }
    }
}

/// The error a [`RequestBody`] ends with when the client sends more than the limit.
#[derive(Debug)]
pub struct BodyTooLarge;

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request body exceeds the configured limit")
    }
}

impl StdError for BodyTooLarge {}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
                    match this.remaining.checked_sub(len) {
                        Some(left) => this.remaining = left,
                        None => return Poll::Ready(Some(Err(Box::new(BodyTooLarge)))),
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => {
                this.in_flight = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether an error, or anything in its chain of causes, is a [`BodyTooLarge`].
pub fn caused_by_body_limit(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<BodyTooLarge>() {
            return true;
        }
        cur = e.source();
    }
    false
}
