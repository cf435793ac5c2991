//! The connection core driven directly: bytes in, events and reasons out, time injected.
//! Nothing here sleeps or touches a socket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use capgate_policy::{ClientClass, Matcher};
use capgate_schema::Catalog;
use capnp::message::Builder;
use capnp_rpc::rpc_capnp::{exception, message};

use super::*;
use crate::guard::Unlimited;
use crate::Limits;

fn limits() -> Limits {
    Limits {
        frame_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(10),
        max_message_bytes: 1 << 16,
        ..Limits::default()
    }
}

/// A core for a reader class (Store.namespace and Reader.* allowed).
fn core() -> ConnectionCore {
    let c = Catalog::builtin();
    let class = ClientClass::new("reader", Matcher::Any)
        .allow("Store.namespace", c)
        .unwrap()
        .allow("Reader.*", c)
        .unwrap();
    ConnectionCore::new(
        &limits(),
        Guard::new(
            Arc::new(class),
            Arc::new(Unlimited),
            Catalog::builtin().clone(),
        ),
    )
}

fn framed(f: impl FnOnce(message::Builder<'_>)) -> Vec<u8> {
    let mut m = Builder::new_default();
    f(m.init_root::<message::Builder>());
    let mut out = Vec::new();
    crate::framing::encode_frame(&mut out, &m.get_segments_for_output());
    out
}

fn call(q: u32, iface: &str, method: &str) -> Vec<u8> {
    let m = Catalog::builtin().method(iface, method).unwrap();
    framed(|b| {
        let mut c = b.init_call();
        c.set_question_id(q);
        c.set_interface_id(m.interface_id);
        c.set_method_id(m.method_id);
        c.reborrow().init_target().set_imported_cap(0);
        c.init_params();
    })
}

/// Feeds all of `bytes`, returning the events of the frames they complete.
fn feed(core: &mut ConnectionCore, mut bytes: &[u8]) -> Result<Vec<Event>, AbortReason> {
    let mut events = Vec::new();
    while !bytes.is_empty() {
        let (n, frame) = core.handle_bytes(bytes)?;
        bytes = &bytes[n..];
        if let Some(frame) = frame {
            events.push(core.inspect(frame, 0)?);
        }
    }
    Ok(events)
}

#[test]
fn an_allowed_call_is_delivered_and_a_denied_one_answered_by_the_core() {
    let mut c = core();
    let mut bytes = call(1, "Reader", "get");
    bytes.extend(call(2, "Namespace", "put"));
    let events = feed(&mut c, &bytes).unwrap();
    assert!(
        matches!(events[0], Event::Deliver { wire_bytes, .. } if wire_bytes == call(1, "Reader", "get").len())
    );
    let Event::Reply(reply) = &events[1] else {
        panic!("a denial is answered")
    };
    let mut r = &reply[..];
    let m = capnp::serialize::read_message(&mut r, Default::default()).unwrap();
    let root = m.get_root::<message::Reader>().unwrap();
    let message::Return(Ok(ret)) = root.which().unwrap() else {
        panic!("a Return")
    };
    assert_eq!(ret.get_answer_id(), 2);
    assert_eq!(c.guard().in_flight_calls(), 1);
}

#[test]
fn a_frame_that_stalls_aborts_at_its_deadline_and_not_before() {
    let mut c = core();
    let t0 = Instant::now();
    let whole = call(1, "Reader", "get");
    // Half a frame, then the shell waits.
    assert!(feed(&mut c, &whole[..20]).unwrap().is_empty());
    c.before_wait(|| t0, 20);
    let deadline = c.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + Duration::from_millis(500));
    assert_eq!(
        c.handle_timeout(t0 + Duration::from_millis(499), 20),
        Ok(())
    );
    let err = c.handle_timeout(deadline, 20).unwrap_err();
    assert_eq!(
        err.to_string(),
        "capgate: frame not completed within 500 ms (frame_timeout); 20 bytes of it had arrived"
    );
    assert_eq!(err.label(), "frame_timeout");
}

#[test]
fn a_completed_frame_leaves_only_the_idle_deadline_and_idleness_closes() {
    let mut c = core();
    let t0 = Instant::now();
    let whole = call(1, "Reader", "get");
    feed(&mut c, &whole[..20]).unwrap();
    c.before_wait(|| t0, 20);
    assert_eq!(feed(&mut c, &whole[20..]).unwrap().len(), 1);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    // The call is in flight: not idle however long it runs.
    let activity = whole.len() as u64;
    assert_eq!(
        c.handle_timeout(t0 + Duration::from_secs(10), activity),
        Ok(())
    );
    let returned = framed(|b| b.init_return().set_answer_id(1));
    let m = capnp::serialize::read_message(&mut &returned[..], Default::default()).unwrap();
    c.outgoing(m.get_root().unwrap()).unwrap();
    // The Return went out (bytes moved): open; then nothing moves for a whole period.
    let activity = activity + returned.len() as u64;
    assert_eq!(
        c.handle_timeout(t0 + Duration::from_secs(20), activity),
        Ok(())
    );
    assert_eq!(
        c.handle_timeout(t0 + Duration::from_secs(30), activity),
        Err(AbortReason::Idle {
            limit: Duration::from_secs(10)
        })
    );
}

#[test]
fn limits_protocol_violations_and_the_peers_abort_are_reasons() {
    let mut c = core();
    // A frame claiming more than max_message_bytes: refused from its segment table.
    let mut huge = Vec::new();
    huge.extend_from_slice(&0u32.to_le_bytes());
    huge.extend_from_slice(&(1u32 << 20).to_le_bytes());
    let err = feed(&mut c, &huge).err().expect("refused");
    assert!(matches!(err, AbortReason::Frame(_)), "{err:?}");
    assert!(err.is_framing());

    let mut c = core();
    let mut twice = call(1, "Reader", "get");
    twice.extend(call(1, "Reader", "get"));
    let err = feed(&mut c, &twice).err().expect("refused");
    assert_eq!(
        err,
        AbortReason::QuestionReused {
            id: 1,
            state: "call in flight"
        }
    );

    let mut c = core();
    let abort = framed(|b| {
        let mut e = b.init_abort();
        e.set_type(exception::Type::Overloaded);
        e.set_reason(format!("bye\n{}", "x".repeat(600)));
    });
    let err = feed(&mut c, &abort).err().expect("refused");
    let AbortReason::PeerAborted { kind, reason } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*kind, capnp::ErrorKind::Overloaded);
    assert!(reason.starts_with("bye\\n"), "{reason}");
    assert!(reason.ends_with("... (604 bytes in all)"), "{reason}");
}

#[test]
fn end_of_stream_is_clean_between_frames_and_an_abort_inside_one() {
    let mut c = core();
    let whole = call(1, "Reader", "get");
    feed(&mut c, &whole).unwrap();
    assert_eq!(c.end_of_stream(), Ok(()));
    feed(&mut c, &whole[..9]).unwrap();
    assert_eq!(c.end_of_stream(), Err(AbortReason::ClosedMidFrame));
}
