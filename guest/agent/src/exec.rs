//! The `exec` request: start a process, relay its stdin/stdout/stderr, enforce the timeout, report
//! its exit.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::cgroup::{self, ExecGroup};
use crate::conn::{Conn, End};
use crate::proto::{self, kind, Encoder, Fields, Frame, BYTES, CHUNK, HEADER, LIST, UINT};
use crate::spawn::{self, Spec};
use crate::{sys, users, Context};

pub const ARGV: u8 = 1;
pub const ENV: u8 = 2;
pub const CWD: u8 = 3;
pub const USER: u8 = 4;
pub const STDIN: u8 = 5;
pub const TIMEOUT_MS: u8 = 6;
pub const KEEP_BACKGROUND: u8 = 7;
pub const PIDS_MAX: u8 = 8;
pub const TTY: u8 = 9;
pub const ROWS: u8 = 10;
pub const COLS: u8 = 11;

pub const STARTED_PID: u8 = 1;
pub const EXIT_STATUS: u8 = 1;
pub const EXIT_SIGNAL: u8 = 2;
pub const EXIT_TIMED_OUT: u8 = 3;
pub const EXIT_DURATION_MS: u8 = 4;
pub const SIGNAL_NUMBER: u8 = 1;
pub const SIGNAL_SCHEMA: &[(u8, u8)] = &[(SIGNAL_NUMBER, UINT)];
/// `resize` fields: the terminal's new size.
pub const RESIZE_ROWS: u8 = 1;
pub const RESIZE_COLS: u8 = 2;
pub const RESIZE_SCHEMA: &[(u8, u8)] = &[(RESIZE_ROWS, UINT), (RESIZE_COLS, UINT)];
/// A terminal's size when the request gives none.
const DEFAULT_TTY_SIZE: (u16, u16) = (24, 80);

pub const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Stop reading the socket while this much stdin is waiting for the process (back-pressure).
const STDIN_BACKLOG: usize = 1 << 20;
/// How long output pipes may stay open after the process exited (a background child holding them).
const LINGER: Duration = Duration::from_millis(100);

pub const SCHEMA: &[(u8, u8)] = &[
    (ARGV, LIST),
    (ENV, LIST),
    (CWD, BYTES),
    (USER, BYTES),
    (STDIN, UINT),
    (TIMEOUT_MS, UINT),
    (KEEP_BACKGROUND, UINT),
    (PIDS_MAX, UINT),
    (TTY, UINT),
    (ROWS, UINT),
    (COLS, UINT),
];

/// An exec request, checked and converted for `spawn`.
pub struct Request {
    pub spec: Spec,
    pub want_stdin: bool,
    pub timeout: Option<Duration>,
    /// Leave the processes the program started running when it exits (not after a timeout).
    pub keep_background: bool,
    /// `pids.max` of the exec's cgroup; 0: no limit of its own.
    pub pids_max: u64,
    /// Run on a new pseudo-terminal of this size (rows, columns): its stdin, stdout and stderr.
    pub tty: Option<(u16, u16)>,
}

/// A terminal size from request fields: both or neither, each 1 to 65535.
pub fn window_size(rows: Option<u64>, cols: Option<u64>) -> Result<Option<(u16, u16)>, String> {
    let fits = |v: u64| (1..=u64::from(u16::MAX)).contains(&v);
    match (rows, cols) {
        (None, None) => Ok(None),
        (Some(r), Some(c)) if fits(r) && fits(c) => Ok(Some((r as u16, c as u16))),
        _ => Err("a terminal size needs rows and columns, each 1 to 65535".into()),
    }
}

/// What a request asks for, checked and converted for `spawn`. `Err` is a one-line request error.
pub fn prepare(fields: &Fields<'_>) -> Result<Request, String> {
    let argv = fields.list(ARGV).unwrap_or(&[]);
    if argv.is_empty() || argv[0].is_empty() {
        return Err("exec needs a non-empty argv".into());
    }
    let identity = match fields.bytes(USER) {
        Some(spec) if !spec.is_empty() => Some(users::resolve(spec)?),
        _ => None,
    };
    let env: Vec<Vec<u8>> = match fields.list(ENV) {
        Some(list) => list.iter().map(|e| e.to_vec()).collect(),
        None => {
            let home: &[u8] = match &identity {
                Some(id) => &id.home,
                // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
                None if unsafe { libc::geteuid() } == 0 => b"/root",
                None => b"/",
            };
            vec![[b"PATH=", DEFAULT_PATH].concat(), [b"HOME=", home].concat()]
        }
    };
    let path_var = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix(b"PATH="))
        .unwrap_or(DEFAULT_PATH);
    let program = argv[0];
    let candidates: Vec<Vec<u8>> = if program.contains(&b'/') {
        vec![program.to_vec()]
    } else {
        path_var
            .split(|&b| b == b':')
            .map(|dir| {
                let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
                [dir, b"/", program].concat()
            })
            .collect()
    };
    let to_c = |items: &[Vec<u8>], what: &str| -> Result<Vec<_>, String> {
        items.iter().map(|b| sys::cstring(b, what)).collect()
    };
    let argv_owned: Vec<Vec<u8>> = argv.iter().map(|a| a.to_vec()).collect();
    let cwd = fields.bytes(CWD).filter(|c| !c.is_empty()).unwrap_or(b"/");
    let timeout = match fields.uint(TIMEOUT_MS) {
        None | Some(0) => None,
        Some(ms) => Some(Duration::from_millis(ms)),
    };
    let spec = Spec {
        candidates: to_c(&candidates, "argv[0]")?,
        argv: to_c(&argv_owned, "an argv element")?,
        envp: to_c(&env, "an environment entry")?,
        cwd: Some(sys::cstring(cwd, "cwd")?),
        identity,
        stdin: -1,
        stdout: -1,
        stderr: -1,
        cgroup_procs: -1,
        controlling_tty: false,
    };
    let tty = if fields.uint(TTY).unwrap_or(0) != 0 {
        Some(window_size(fields.uint(ROWS), fields.uint(COLS))?.unwrap_or(DEFAULT_TTY_SIZE))
    } else {
        None
    };
    Ok(Request {
        spec,
        want_stdin: fields.uint(STDIN).unwrap_or(0) != 0,
        timeout,
        keep_background: fields.uint(KEEP_BACKGROUND).unwrap_or(0) != 0,
        pids_max: fields.uint(PIDS_MAX).unwrap_or(cgroup::DEFAULT_PIDS_MAX),
        tty,
    })
}

/// Reports a program that could not be executed the way a shell does: `started`, one line on
/// stderr and exit status 127 (not found) or 126 (not executable), so callers see the status.
fn report_exec_failure(
    conn: &Conn,
    pid: libc::pid_t,
    failure: &spawn::Failure,
    spec: &Spec,
    started: Instant,
) -> Result<(), End> {
    let (status, line) = failure.exec_failure(spec);
    let payload = Encoder::new().uint(STARTED_PID, pid as u64).finish();
    proto::send(conn.fd(), kind::STARTED, &payload)?;
    proto::send(conn.fd(), kind::STDERR, format!("{line}\n").as_bytes())?;
    let payload = Encoder::new()
        .uint(EXIT_STATUS, status as u64)
        .uint(EXIT_TIMED_OUT, 0)
        .uint(EXIT_DURATION_MS, started.elapsed().as_millis() as u64)
        .finish();
    proto::send(conn.fd(), kind::EXIT, &payload)?;
    Ok(())
}

/// The descriptors of one exec: the child's ends (closed here once it has its copies) and ours.
struct Streams {
    /// The child's stdin, stdout and stderr (a pipe end each, `/dev/null`, or one terminal).
    child: Vec<OwnedFd>,
    out: Option<OwnedFd>,
    err: Option<OwnedFd>,
    stdin: Option<OwnedFd>,
    /// The terminal's master end, for window size changes.
    tty: Option<OwnedFd>,
}

/// Pipes for stdout and stderr, and for stdin if asked (else `/dev/null`, when there is one).
fn pipes(spec: &mut Spec, want_stdin: bool, devnull: Option<&OwnedFd>) -> std::io::Result<Streams> {
    let stdin = if want_stdin || devnull.is_none() {
        Some(sys::pipe()?)
    } else {
        None
    };
    let ((out_r, out_w), (err_r, err_w)) = (sys::pipe()?, sys::pipe()?);
    let mut streams = Streams {
        child: Vec::new(),
        out: Some(out_r),
        err: Some(err_r),
        stdin: None,
        tty: None,
    };
    spec.stdin = match (stdin, devnull) {
        (Some((r, w)), _) => {
            streams.stdin = want_stdin.then_some(w);
            let fd = r.as_raw_fd();
            streams.child.push(r);
            fd
        }
        (None, Some(null)) => null.as_raw_fd(),
        (None, None) => unreachable!("a stdin pipe exists when /dev/null is missing"),
    };
    spec.stdout = out_w.as_raw_fd();
    spec.stderr = err_w.as_raw_fd();
    streams.child.extend([out_w, err_w]);
    Ok(streams)
}

/// A new pseudo-terminal of `size` as the child's stdin, stdout and stderr and its controlling
/// terminal; output comes back as `stdout` only, as from a terminal.
fn terminal(spec: &mut Spec, want_stdin: bool, size: (u16, u16)) -> std::io::Result<Streams> {
    let (master, peer) = sys::open_pty()?;
    sys::set_window_size(&master, size.0, size.1)?;
    spec.stdin = peer.as_raw_fd();
    spec.stdout = peer.as_raw_fd();
    spec.stderr = peer.as_raw_fd();
    spec.controlling_tty = true;
    let dup = |fd: &OwnedFd| fd.try_clone();
    Ok(Streams {
        child: vec![peer],
        out: Some(dup(&master)?),
        err: None,
        stdin: if want_stdin {
            Some(dup(&master)?)
        } else {
            None
        },
        tty: Some(master),
    })
}

pub fn run(conn: &mut Conn, frame: &Frame, ctx: &Context) -> Result<(), End> {
    let fields = Conn::decode(frame, SCHEMA)?;
    let request = match prepare(&fields) {
        Ok(prepared) => prepared,
        Err(message) => return conn.reply_error("request", None, &message),
    };
    drop(fields);
    let Request {
        mut spec,
        want_stdin,
        timeout,
        keep_background,
        pids_max,
        tty,
    } = request;

    let streams = match tty {
        Some(size) => terminal(&mut spec, want_stdin, size),
        None => pipes(&mut spec, want_stdin, ctx.devnull.as_ref()),
    };
    let Streams {
        child,
        out,
        err,
        stdin: mut stdin_w,
        tty,
    } = match streams {
        Ok(streams) => streams,
        Err(e) => {
            let what = if tty.is_some() {
                "pseudo-terminal"
            } else {
                "pipe"
            };
            return conn.reply_error(
                "os",
                e.raw_os_error(),
                &format!("{what}: {}", sys::errno_text(&e)),
            );
        }
    };
    let group = ExecGroup::create(pids_max);
    spec.cgroup_procs = group.as_ref().map_or(-1, ExecGroup::procs_fd);

    let started = Instant::now();
    let result = spawn::spawn(&spec, &mut conn.stack);
    // The child has its copies (or is gone): close ours so EOF can be seen.
    drop(child);
    let (pid, pidfd) = match result {
        Ok(started) => started,
        Err(failure) => {
            if let Some(group) = group {
                group.finish(false);
            }
            if failure.stage == spawn::Stage::Exec {
                return report_exec_failure(conn, failure.pid, &failure, &spec, started);
            }
            return conn.reply_error("os", Some(failure.errno), &failure.message(&spec));
        }
    };
    if let Some(w) = &stdin_w {
        if sys::set_nonblocking(w).is_err() {
            stdin_w = None;
        }
    }
    let payload = Encoder::new().uint(STARTED_PID, pid as u64).finish();
    let mut running = Running {
        pid,
        pidfd,
        out,
        err,
        stdin: stdin_w,
        tty,
        pending: Vec::new(),
        pending_at: 0,
        stdin_closing: false,
        status: None,
        exited_at: None,
        deadline: timeout.map(|t| started + t),
        timed_out: false,
        connected: true,
        violation: None,
        group,
        keep_background,
    };
    if proto::send(conn.fd(), kind::STARTED, &payload).is_err() {
        running.disconnect();
    }
    let relayed = running.relay(conn);
    if let Some(group) = running.group.take() {
        // A timeout or a vanished client ends the whole tree, whatever the request said.
        group.finish(running.keep_background && !running.timed_out && running.connected);
    }
    relayed?;
    let status = running.status.unwrap_or(0);
    let duration = running.exited_at.unwrap_or_else(Instant::now) - started;
    if let Some(message) = running.violation {
        return Err(End::Fatal(message));
    }
    if !running.connected {
        return Err(End::Closed);
    }
    let mut enc = Encoder::new();
    if libc::WIFSIGNALED(status) {
        enc = enc.uint(EXIT_SIGNAL, libc::WTERMSIG(status) as u64);
    } else {
        enc = enc.uint(EXIT_STATUS, libc::WEXITSTATUS(status) as u64);
    }
    let payload = enc
        .uint(EXIT_TIMED_OUT, running.timed_out as u64)
        .uint(EXIT_DURATION_MS, duration.as_millis() as u64)
        .finish();
    proto::send(conn.fd(), kind::EXIT, &payload)?;
    Ok(())
}

struct Running {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    out: Option<OwnedFd>,
    err: Option<OwnedFd>,
    stdin: Option<OwnedFd>,
    /// The terminal's master end, when the process runs on one.
    tty: Option<OwnedFd>,
    pending: Vec<u8>,
    pending_at: usize,
    stdin_closing: bool,
    status: Option<libc::c_int>,
    exited_at: Option<Instant>,
    deadline: Option<Instant>,
    timed_out: bool,
    /// False once the client went away: the process group is killed, output is discarded.
    connected: bool,
    /// A protocol violation seen while the process ran: reported once it is gone.
    violation: Option<String>,
    /// The exec's cgroup, where the kernel has them (see `cgroup`).
    group: Option<ExecGroup>,
    keep_background: bool,
}

fn ms_until(when: Instant, now: Instant) -> libc::c_int {
    let left = when.saturating_duration_since(now);
    // Round up so that poll does not wake just before the moment.
    let ms = left.as_micros().div_ceil(1000);
    ms.min(i32::MAX as u128) as libc::c_int
}

impl Running {
    fn disconnect(&mut self) {
        if self.connected {
            self.connected = false;
            self.kill_tree();
        }
    }

    /// SIGKILL to everything the exec started: its cgroup, and its process group (all there is
    /// to kill without cgroups). Safe after the process has exited: `kill_group_only` never falls
    /// back to a single pid that may have been reused.
    fn kill_tree(&self) {
        if let Some(group) = &self.group {
            group.kill();
        }
        sys::kill_group_only(self.pid, libc::SIGKILL);
    }

    fn kill(&self, sig: libc::c_int) {
        if self.status.is_none() {
            sys::kill_group(self.pid, sig);
        }
    }

    fn stop_stdin(&mut self) {
        self.stdin = None;
        self.pending.clear();
        self.pending_at = 0;
    }

    /// Handles frames the client sent while the process runs.
    fn take_frames(&mut self, conn: &mut Conn) {
        loop {
            let frame = match conn.reader.next_buffered() {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(e) => {
                    if let End::Fatal(message) = End::from(e) {
                        self.violation.get_or_insert(message);
                    }
                    self.disconnect();
                    return;
                }
            };
            match frame.kind {
                kind::STDIN => {
                    if self.stdin.is_some() && !self.stdin_closing {
                        if self.pending_at == self.pending.len() {
                            self.pending.clear();
                            self.pending_at = 0;
                        }
                        self.pending.extend_from_slice(&frame.payload);
                    }
                }
                kind::STDIN_CLOSE => self.stdin_closing = true,
                kind::RESIZE => match Fields::decode(&frame.payload, RESIZE_SCHEMA)
                    .map(|f| window_size(f.uint(RESIZE_ROWS), f.uint(RESIZE_COLS)))
                {
                    Ok(Ok(Some((rows, cols)))) => {
                        if let Some(tty) = &self.tty {
                            // A terminal gone with its process: nothing left to resize.
                            let _ = sys::set_window_size(tty, rows, cols);
                        }
                    }
                    _ => {
                        self.violation
                            .get_or_insert("resize request without a valid size".into());
                        self.disconnect();
                    }
                },
                kind::SIGNAL => match Fields::decode(&frame.payload, SIGNAL_SCHEMA) {
                    Ok(f) => match f.uint(SIGNAL_NUMBER) {
                        Some(sig) if (1..=64).contains(&sig) => self.kill(sig as libc::c_int),
                        _ => {
                            self.violation
                                .get_or_insert("signal request without a valid signal".into());
                            self.disconnect();
                        }
                    },
                    Err(e) => {
                        self.violation
                            .get_or_insert(format!("malformed signal request: {e}"));
                        self.disconnect();
                    }
                },
                other => {
                    self.violation.get_or_insert(format!(
                        "unexpected {} frame while a process is running",
                        kind::name(other)
                    ));
                    self.disconnect();
                }
            }
        }
    }

    /// Forwards one chunk from an output pipe; returns false at EOF.
    fn forward(&mut self, conn: &mut Conn, fd: &OwnedFd, frame_kind: u8) -> bool {
        let mut chunk = std::mem::take(&mut conn.buf);
        chunk.clear();
        chunk.reserve(HEADER + CHUNK);
        chunk.extend_from_slice(&[0u8; HEADER]);
        // SAFETY: after `clear`, `reserve(HEADER + CHUNK)` and the HEADER-byte extend, the vector
        // has length HEADER and at least CHUNK bytes of spare capacity from `as_mut_ptr() + HEADER`,
        // so the kernel may write up to CHUNK bytes there. `chunk` is a local the call borrows.
        let ret =
            unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().add(HEADER).cast(), CHUNK) };
        let more = if ret < 0 {
            let kind = std::io::Error::last_os_error().kind();
            kind == std::io::ErrorKind::Interrupted || kind == std::io::ErrorKind::WouldBlock
        } else if ret == 0 {
            false
        } else {
            // SAFETY: 0 < ret <= CHUNK, so `HEADER + ret` is within the capacity reserved above,
            // and read initialised exactly those `ret` bytes after the header.
            unsafe { chunk.set_len(HEADER + ret as usize) };
            if self.connected && proto::send_prefixed(conn.fd(), frame_kind, &mut chunk).is_err() {
                self.disconnect();
            }
            true
        };
        conn.buf = chunk;
        more
    }

    fn relay(&mut self, conn: &mut Conn) -> Result<(), End> {
        loop {
            if self.connected {
                self.take_frames(conn);
            }
            if self.stdin_closing && self.pending_at == self.pending.len() {
                self.stop_stdin();
            }
            let now = Instant::now();
            if self.status.is_some() {
                let lingered = self.exited_at.is_some_and(|t| now >= t + LINGER);
                if (self.out.is_none() && self.err.is_none()) || lingered {
                    return Ok(());
                }
            } else if let Some(deadline) = self.deadline {
                if now >= deadline && !self.timed_out {
                    self.timed_out = true;
                    self.kill(libc::SIGKILL);
                    self.kill_tree();
                }
            }

            let mut fds: [libc::pollfd; 5] = [libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            }; 5];
            const SOCK: usize = 0;
            const OUT: usize = 1;
            const ERR: usize = 2;
            const IN: usize = 3;
            const PID: usize = 4;
            if self.connected && self.pending.len() - self.pending_at < STDIN_BACKLOG {
                fds[SOCK] = libc::pollfd {
                    fd: conn.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
            }
            if let Some(fd) = &self.out {
                fds[OUT] = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
            }
            if let Some(fd) = &self.err {
                fds[ERR] = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
            }
            if let Some(fd) = &self.stdin {
                if self.pending_at < self.pending.len() {
                    fds[IN] = libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                }
            }
            if self.status.is_none() {
                fds[PID] = libc::pollfd {
                    fd: self.pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
            }
            let wake = match (self.exited_at, self.deadline) {
                (Some(t), _) => Some(t + LINGER),
                (None, Some(d)) if !self.timed_out => Some(d),
                _ => None,
            };
            let timeout = wake.map_or(-1, |w| ms_until(w, now));
            if let Err(e) = sys::poll(&mut fds, timeout) {
                return Err(End::Fatal(format!("poll: {}", sys::errno_text(&e))));
            }

            if fds[PID].revents != 0 {
                self.status = Some(crate::reaper::get().wait(self.pid));
                self.exited_at = Some(Instant::now());
                self.stop_stdin();
                if !self.keep_background {
                    self.kill_tree();
                }
            }
            let ready =
                |i: usize| fds[i].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
            if ready(OUT) {
                let fd = self.out.take().expect("polled");
                if self.forward(conn, &fd, kind::STDOUT) {
                    self.out = Some(fd);
                }
            }
            if ready(ERR) {
                let fd = self.err.take().expect("polled");
                if self.forward(conn, &fd, kind::STDERR) {
                    self.err = Some(fd);
                }
            }
            if fds[IN].revents != 0 {
                if let Some(fd) = &self.stdin {
                    match sys::write(fd.as_raw_fd(), &self.pending[self.pending_at..]) {
                        Ok(n) => self.pending_at += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        // EPIPE: the process closed its stdin; drop what it will never read.
                        Err(_) => self.stop_stdin(),
                    }
                }
            }
            if fds[SOCK].revents != 0 {
                match conn.reader.fill_once() {
                    Ok(true) => {}
                    Ok(false) | Err(_) => self.disconnect(),
                }
            }
        }
    }
}
