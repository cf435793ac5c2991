//! The guard's seam: every incoming message passes through [`Guard::incoming`] before
//! capnp-rpc sees it, and every outgoing message through [`Guard::outgoing`] before the
//! writer queues it.
//!
//! This version delivers everything and keeps the accounting the server needs now: which
//! incoming calls are in flight (delivered, neither returned nor finished), so a graceful
//! shutdown can wait for them. Policy decisions plug in here.

use std::collections::HashSet;

use capnp_rpc::rpc_capnp::message;

/// What to do with one incoming message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to capnp-rpc.
    Deliver,
    /// Close the connection; the reason goes to the peer in an `Abort`.
    Abort(String),
}

/// Per-connection, sans-IO message guard.
#[derive(Debug, Default)]
pub struct Guard {
    /// Question ids of incoming calls delivered and neither returned nor finished.
    in_flight: HashSet<u32>,
    calls: u64,
}

impl Guard {
    /// A guard that delivers every message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inspects an incoming message.
    pub fn incoming(&mut self, msg: message::Reader<'_>) -> Verdict {
        match msg.which() {
            Ok(message::Call(Ok(call))) => {
                self.calls += 1;
                self.in_flight.insert(call.get_question_id());
            }
            Ok(message::Finish(Ok(finish))) => {
                self.in_flight.remove(&finish.get_question_id());
            }
            // Anything else (including what does not parse) is capnp-rpc's to judge.
            _ => {}
        }
        Verdict::Deliver
    }

    /// Accounts for an outgoing message.
    pub fn outgoing(&mut self, msg: message::Reader<'_>) {
        if let Ok(message::Return(Ok(ret))) = msg.which() {
            self.in_flight.remove(&ret.get_answer_id());
        }
    }

    /// Incoming calls delivered and neither returned nor finished.
    pub fn in_flight_calls(&self) -> usize {
        self.in_flight.len()
    }

    /// Incoming calls delivered since the connection opened.
    pub fn calls_delivered(&self) -> u64 {
        self.calls
    }
}
