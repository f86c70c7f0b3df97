//! Zero-copy relaying between TCP sockets with splice(2): bytes move socket -> pipe -> socket
//! as page references, never through user memory. Pipes are pooled per thread and held only
//! while bytes are in them, so idle tunnels hold none (descriptors are the scarce resource).

use std::{
    cell::RefCell,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::{io::Interest, net::TcpStream};

/// Bytes moved per splice call at most: the capacity asked for each pipe (the default is 64 KiB;
/// larger means fewer calls per GiB). A pipe that got less just takes less per call.
pub const CHUNK: usize = 256 * 1024;
/// Idle pipes kept for reuse per thread (two descriptors each).
const POOL_MAX: usize = 16;

pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What the pipe holds at most: a fill that got this much left bytes in the socket.
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let mut pipe = unsafe {
            Self {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
                capacity: 0,
            }
        };
        #[cfg(not(test))]
        let size = CHUNK;
        #[cfg(test)]
        let size = PIPE_SIZE.get();
        // Best effort: above fs.pipe-max-size, or over the user's pipe quota, it stays smaller.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        // SAFETY: as above.
        let capacity = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        // Unknown: never taken for full (no SPLICE_F_MORE, one round a wakeup).
        pipe.capacity = usize::try_from(capacity)
            .ok()
            .filter(|&c| c > 0)
            .unwrap_or(usize::MAX);
        Ok(pipe)
    }

    /// Whether a fill of `n` bytes filled the pipe: the socket likely holds more.
    pub fn filled_by(&self, n: usize) -> bool {
        n >= self.capacity
    }
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Tests of the memory-copy fallback turn pipes off on their thread.
    pub static NO_PIPES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The size new pipes on this thread ask for.
    static PIPE_SIZE: std::cell::Cell<usize> = const { std::cell::Cell::new(CHUNK) };
    /// How many times [`push`] ran on this thread.
    pub static PUSHES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Tests: new pipes on this thread ask for `size` bytes, and the pooled ones are dropped.
#[cfg(test)]
pub fn set_pipe_size(size: usize) {
    PIPE_SIZE.set(size);
    POOL.with(|pool| pool.borrow_mut().clear());
}

/// An empty pipe from the pool, or a new one; None when no descriptor is left (the caller
/// copies through memory instead).
pub fn take() -> Option<Pipe> {
    #[cfg(test)]
    if NO_PIPES.get() {
        return None;
    }
    POOL.with(|pool| pool.borrow_mut().pop())
        .or_else(|| Pipe::new().ok())
}

/// Returns an empty pipe to the pool.
pub fn give_back(pipe: Pipe) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_MAX {
            pool.push(pipe);
        }
    });
}

fn splice(from: i32, to: i32, len: usize, more: bool) -> io::Result<usize> {
    let mut flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    if more {
        flags |= libc::SPLICE_F_MORE;
    }
    // SAFETY: plain splice(2) between descriptors we hold, no offsets.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves up to [`CHUNK`] bytes from `src` into the (empty) pipe. Ok(0) is end of stream;
/// WouldBlock clears `src`'s read readiness, as tokio requires.
pub fn fill(pipe: &Pipe, src: &TcpStream) -> io::Result<usize> {
    src.try_io(Interest::READABLE, || {
        splice(src.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK, false)
    })
}

/// Moves up to `len` bytes from the pipe into `dst`; WouldBlock clears `dst`'s write readiness.
/// `more`: more bytes are known to follow (the fill filled the pipe), so TCP may hold a last
/// partial segment for them; whoever drains with `more` must [`push`] once no more came.
pub fn drain(pipe: &Pipe, dst: &TcpStream, len: usize, more: bool) -> io::Result<usize> {
    dst.try_io(Interest::WRITABLE, || {
        splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), len, more)
    })
}

/// Sends what drains with `more` left held in `dst`: setting TCP_NODELAY (already set on every
/// relayed socket) makes the kernel push pending segments. Without it a held tail waits for an
/// ACK of earlier data or, with nothing in flight, for TCP's probe timer (200 ms or more).
pub fn push(dst: &TcpStream) -> io::Result<()> {
    #[cfg(test)]
    PUSHES.set(PUSHES.get() + 1);
    dst.set_nodelay(true)
}
