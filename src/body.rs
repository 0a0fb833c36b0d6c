//! The two body types on the proxy path. Both stream: nothing here buffers a body.

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
    Upstream(crate::pipeline::forward::UpstreamBody),
    Full(Option<Bytes>),
    /// The upstream's body, which the access log counts, and logs when it ends.
    Logged(crate::access_log::LoggedBody),
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
            ResponseBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Logged(logged) => {
                let polled = Pin::new(&mut logged.inner).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(data) = frame.data_ref() {
                        logged.count(data.len());
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(body) => body.is_end_stream(),
            ResponseBody::Full(bytes) => bytes.is_none(),
            ResponseBody::Logged(logged) => logged.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(body) => body.size_hint(),
            ResponseBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ResponseBody::Logged(logged) => logged.inner.size_hint(),
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
