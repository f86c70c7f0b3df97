//! What the container engine or the Kubernetes API server answers, arbitrary bytes followed by
//! the server closing: the client never panics or hangs, hands back no more body than was sent,
//! and reads the body as a pod list without panicking. The same bytes as a cgroup directory's
//! name: a pod UID is found only where the name ends with it.

#![no_main]

use egress_user::fuzzing::{api_answer, pod_uid_in};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|answer: &[u8]| {
    if let Some((_status, body)) = api_answer(answer) {
        assert!(body <= answer.len(), "a body longer than the answer");
    }
    if let Ok(name) = std::str::from_utf8(answer)
        && let Some(uid) = pod_uid_in(name)
    {
        assert!(uid.len() == 32 || uid.len() == 36, "{uid:?}");
        let written = uid.replace('-', "_");
        let base = name.strip_suffix(".slice").unwrap_or(name);
        assert!(
            base.ends_with(&uid) || base.ends_with(&written),
            "{uid:?} is not the end of {name:?}"
        );
    }
});
