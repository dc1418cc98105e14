//! A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe`: JSON messages
//! separated by NUL bytes, commands on the browser's fd 3, replies and events on its fd 4.
//!
//! No debugging port is opened, so no other local process can drive the browser. Only what
//! the snapshotter needs is here: send a command and wait for its reply (buffering events
//! that arrive meanwhile), and wait for an event.

use std::{collections::VecDeque, os::fd::OwnedFd};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::unix::pipe,
};

/// Largest message accepted from the browser (the page's HTML travels in one).
pub(crate) const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Most events kept while waiting for something else.
const MAX_EVENTS: usize = 10_000;

/// A CDP failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CdpError {
    #[error("DevTools pipe: {0}")]
    Io(#[from] std::io::Error),
    #[error("the browser closed the DevTools pipe")]
    Closed,
    #[error("DevTools message over {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("malformed DevTools message: {0}")]
    Malformed(String),
    #[error("{method} failed: {message}")]
    Command { method: String, message: String },
}

pub(crate) struct Cdp {
    tx: pipe::Sender,
    rx: pipe::Receiver,
    buf: Vec<u8>,
    next_id: u64,
    events: VecDeque<Value>,
}

impl Cdp {
    pub(crate) fn new(to_browser: OwnedFd, from_browser: OwnedFd) -> Result<Self, CdpError> {
        Ok(Cdp {
            tx: pipe::Sender::from_owned_fd(to_browser)?,
            rx: pipe::Receiver::from_owned_fd(from_browser)?,
            buf: Vec::new(),
            next_id: 1,
            events: VecDeque::new(),
        })
    }

    async fn read_message(&mut self) -> Result<Value, CdpError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == 0) {
                let msg: Vec<u8> = self.buf.drain(..=end).collect();
                return serde_json::from_slice(&msg[..msg.len() - 1])
                    .map_err(|e| CdpError::Malformed(e.to_string()));
            }
            if self.buf.len() > MAX_MESSAGE {
                return Err(CdpError::TooLarge);
            }
            let mut chunk = vec![0u8; 256 * 1024];
            let n = self.rx.read(&mut chunk).await?;
            if n == 0 {
                return Err(CdpError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn keep_event(&mut self, msg: Value) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(msg);
    }

    /// Sends `method` and waits for its result.
    pub(crate) async fn call(
        &mut self,
        method: &str,
        params: Value,
        session: Option<&str>,
    ) -> Result<Value, CdpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| CdpError::Malformed(e.to_string()))?;
        bytes.push(0);
        self.tx.write_all(&bytes).await?;
        loop {
            let reply = self.read_message().await?;
            if reply.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(err) = reply.get("error") {
                    return Err(CdpError::Command {
                        method: method.to_string(),
                        message: err
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("unknown error")
                            .to_string(),
                    });
                }
                return Ok(reply.get("result").cloned().unwrap_or(Value::Null));
            }
            if reply.get("method").is_some() {
                self.keep_event(reply);
            }
        }
    }

    /// Waits for the event `method` (of `session`), taking a buffered one first.
    pub(crate) async fn wait_event(
        &mut self,
        method: &str,
        session: Option<&str>,
    ) -> Result<Value, CdpError> {
        let matches = |m: &Value| {
            m.get("method").and_then(Value::as_str) == Some(method)
                && (session.is_none() || m.get("sessionId").and_then(Value::as_str) == session)
        };
        if let Some(pos) = self.events.iter().position(matches)
            && let Some(ev) = self.events.remove(pos)
        {
            return Ok(ev);
        }
        loop {
            let msg = self.read_message().await?;
            if matches(&msg) {
                return Ok(msg);
            }
            if msg.get("method").is_some() {
                self.keep_event(msg);
            }
        }
    }

    /// Events received so far that were not waited for.
    pub(crate) fn events(&self) -> impl Iterator<Item = &Value> {
        self.events.iter()
    }
}
