/* SPDX-License-Identifier: MIT
 *
 * stub.c - the installed `spliceproxy` command, and the per-port process of
 * the host engine mode.
 *
 * It is the entry dockerd is given (userland-proxy-path).  A proxy command
 * line in engine mode is served here, with no shell and no interpreter
 * started; anything else (standalone proxy, -h, -v, subcommands) is exec'd
 * to the Python front end installed beside it, spliceproxy-front, with the
 * same arguments, descriptors and signal state.
 *
 * dockerd starts one userland proxy per published port and expects it to
 * live as long as the mapping.  In engine mode (the default) that
 * process is this stub: it hands its command line, its SPLICEPROXY_*
 * environment and its descriptors 1, 2 and 4 to the host engine over the
 * engine's control socket (AF_UNIX SOCK_SEQPACKET, SCM_RIGHTS), then only
 * waits.  The engine parses the flags and serves the port in its one epoll
 * loop; the stub gets back its exit code and error text on failure or a
 * duplicate of the listening socket on success, and answers fd 3.
 *
 * Why the stub keeps that duplicate: if the engine dies, the port stays
 * bound (new connections wait in the backlog), and the stub registers the
 * same socket with a fresh engine.  Why it keeps the control connection: a
 * stub that dies in any way hangs it up, and the engine removes its mapping.
 *
 * Stopping (SIGINT from dockerd, SIGTERM from the parent-death signal) asks
 * the engine to remove the mapping and exits 0 once the engine has closed
 * the listener, so the port can be bound again at once; if the engine does
 * not answer within STOP_WAIT_MS the stub exits anyway.
 *
 * The first stub that finds no engine starts one (`spliceproxy engine`, the
 * Python front end next to this binary) in its own session, under a lock so
 * that concurrent first stubs start exactly one.
 *
 * Plain C, no Python, built static: it is one process per published port,
 * so what it costs is multiplied by the number of ports.  Messages are
 * described in src/spliceproxy/control.py.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/capability.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "../userns.h"

#define STATUS_FD 3
#define LISTEN_FD 4
#define MSG_MAX 65536           /* the engine accepts requests up to this size */
#define START_WAIT_MS 12000     /* dockerd gives up after 16 s */
#define STOP_WAIT_MS 2000       /* longest a stop waits for the engine */
#define SPAWN_TRIES 3           /* engines started for one request, at most */
#define ENV_PREFIX "SPLICEPROXY_"
#define LAUNCHER_NAME "spliceproxy-front"  /* the Python front end, beside us */
/* How the front end learns the name it was run by (shown_name()); not a
 * SPLICEPROXY_* setting, so never forwarded to the engine. */
#define PROG_ENV "_SPLICEPROXY_PROG"
/* Why a proxy command line meant for the engine is served standalone after
 * all (no control socket possible); the front end logs it once. */
#define WHY_ENV "_SPLICEPROXY_STANDALONE_WHY"
/* The control socket of the engine of one network namespace, by its device
 * and inode (control.py's socket_name() says the same). */
#define SOCKET_NAME_FMT "engine-netns-%lu-%lu.sock"

extern char **environ;

static char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static char sock_dir[sizeof(sock_path)];
/* Our network namespace, passed with every mapping: the engine serves only
 * the namespace it runs in, and checks. */
static int netns_fd = -1;
static char msg_buf[MSG_MAX];
static int have_status;
static int have_listen;
static char prog[PATH_MAX];   /* shown_name()'s buffer */
static const char *argv0;
static int sig_fd = -1;

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* write(2) all of buf, retrying EINTR; errors are ignored (nobody to tell). */
static void write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = write(fd, buf, len);

		if (n == -1) {
			if (errno == EINTR)
				continue;
			return;
		}
		buf += n;
		len -= (size_t)n;
	}
}

/* How to mend an install whose launcher is missing beside the stub. */
#define REINSTALL_HINT                                                       \
	"the spliceproxy launcher (" LAUNCHER_NAME ") belongs beside this "   \
	"stub: reinstall spliceproxy (README, Quick start) and give dockerd "   \
	"the path that `spliceproxy install-path` prints"

/* "1\n<msg>" in one write on fd 3 (no trailing newline, as docker-proxy),
 * then fd 3 closed: dockerd reads the text up to EOF. */
static void status_failed(const char *msg)
{
	char out[1024];
	size_t len = strlen(msg);
	size_t n = len < sizeof(out) - 2 ? len : sizeof(out) - 2;

	if (!have_status)
		return;
	out[0] = '1';
	out[1] = '\n';
	memcpy(out + 2, msg, n);
	write_all(STATUS_FD, out, n + 2);
	close(STATUS_FD);
	have_status = 0;
}

/**
 * fail() - report a startup failure the way dockerd reads it, and exit 1.
 * @msg: the error text
 *
 * "1\n<msg>" in one write on fd 3 (no trailing newline, as docker-proxy),
 * the text on stderr too.
 */
static void __attribute__((noreturn)) fail(const char *msg)
{
	size_t len = strlen(msg);

	status_failed(msg);
	write_all(2, "spliceproxy: ", 13);
	write_all(2, msg, len);
	write_all(2, "\n", 1);
	_exit(1);
}

static int fd_is_open(int fd)
{
	return fcntl(fd, F_GETFD) != -1;
}

/* Keep our own descriptors off fds 3 and 4 when those were not inherited, so
 * that "fd 3" in a request always means dockerd's status pipe. */
static void reserve_fd(int fd)
{
	int null;

	if (fd_is_open(fd))
		return;
	null = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (null == -1)
		return;
	if (null != fd) {
		dup3(null, fd, O_CLOEXEC);
		close(null);
	}
}

/* The Python launcher installed next to this binary: the stub's own real
 * path (/proc/self/exe, so a pipx or uv symlink resolves) with its last
 * component replaced by LAUNCHER_NAME. */
static int launcher_path(char *out, size_t cap)
{
	ssize_t n = readlink("/proc/self/exe", out, cap - 1);
	char *slash;

	if (n == -1)
		return -errno;
	out[n] = '\0';
	slash = strrchr(out, '/');
	if (!slash || (size_t)(slash - out) + sizeof("/" LAUNCHER_NAME) > cap)
		return -ENAMETOOLONG;
	strcpy(slash, "/" LAUNCHER_NAME);
	return 0;
}

/**
 * shown_name() - the command's name as usage and flag errors show it.
 *
 * What a script's $0 was when the installed command was the launcher itself:
 * the path it was run by, except that a symbolic link (pipx, uv) or a bare
 * name looked up on PATH shows the real path.  Engine mode sends it to the
 * engine as argv[0]; the front end gets it in PROG_ENV, since a script's
 * interpreter sees the script's path, never the argv[0] it was exec'd with.
 */
static const char *shown_name(const char *arg0)
{
	struct stat st;
	ssize_t n;

	if (arg0 && strchr(arg0, '/') && (lstat(arg0, &st) == -1 || !S_ISLNK(st.st_mode)))
		return arg0;
	n = readlink("/proc/self/exe", prog, sizeof(prog) - 1);
	if (n == -1)
		return arg0 ? arg0 : "spliceproxy";
	prog[n] = '\0';
	return prog;
}

/**
 * resolve_socket() - the engine's control socket path and its directory.
 *
 * One engine per network namespace: a mapping must be bound and connected
 * from its own stub's namespace (where dockerd is, and its route to the
 * bridge), so the socket's name is derived from the namespace's identity,
 * the device and inode of /proc/self/ns/net, in SPLICEPROXY_ENGINE_DIR,
 * root's /run/spliceproxy or a user's $XDG_RUNTIME_DIR/spliceproxy.  Root
 * of a user namespace other than the host's, with XDG_RUNTIME_DIR set, is
 * the user it is on the host: a rootless dockerd runs as RootlessKit's root,
 * whose /run is a copy in which /run/spliceproxy may be a link to the
 * host's.  SPLICEPROXY_ENGINE_SOCKET names one socket outright; its engine still
 * refuses a stub of another namespace.  Opens netns_fd.  Returns -ENOENT
 * when no directory applies (no runtime directory) and -ENAMETOOLONG for a
 * path that does not fit a socket address (the port is then served
 * standalone), another -errno when the namespace cannot be known (no /proc;
 * -ENODEV for ENOENT).
 */
static int resolve_socket(void)
{
	const char *env = getenv(ENV_PREFIX "ENGINE_SOCKET");
	const char *dir = getenv(ENV_PREFIX "ENGINE_DIR");
	const char *runtime = getenv("XDG_RUNTIME_DIR");
	struct stat st;
	char *slash;
	int n;

	netns_fd = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
	if (netns_fd == -1 || fstat(netns_fd, &st) == -1)
		return errno == ENOENT ? -ENODEV : -errno;
	if (env && *env) {
		n = snprintf(sock_path, sizeof(sock_path), "%s", env);
	} else {
		if (dir && *dir)
			n = snprintf(sock_dir, sizeof(sock_dir), "%s", dir);
		else if (geteuid() == 0 && (!runtime || runtime[0] != '/' || sp_initial_userns()))
			n = snprintf(sock_dir, sizeof(sock_dir), "/run/spliceproxy");
		else if (runtime && runtime[0] == '/')
			n = snprintf(sock_dir, sizeof(sock_dir), "%s/spliceproxy", runtime);
		else
			return -ENOENT;
		if (n < 0 || (size_t)n >= sizeof(sock_dir))
			return -ENAMETOOLONG;
		n = snprintf(sock_path, sizeof(sock_path), "%s/" SOCKET_NAME_FMT, sock_dir,
			     (unsigned long)st.st_dev, (unsigned long)st.st_ino);
	}
	if (n < 0 || (size_t)n >= sizeof(sock_path))
		return -ENAMETOOLONG;
	memcpy(sock_dir, sock_path, sizeof(sock_dir));
	slash = strrchr(sock_dir, '/');
	if (!slash)
		snprintf(sock_dir, sizeof(sock_dir), ".");
	else if (slash == sock_dir)
		slash[1] = '\0';
	else
		*slash = '\0';
	return 0;
}

/**
 * check_dir() - create the socket's directory if missing, refuse a foreign one.
 * @why: what is wrong with it, when it is refused
 *
 * The directory is the socket's only protection worth the name (the mode of
 * a socket file is not honoured everywhere): it must be a real directory,
 * owned by us, with no access for group or others.  Returns 0, or -errno
 * with @why filled in: no control socket is possible there, and the port is
 * served standalone rather than not at all.
 */
static int check_dir(char *why, size_t cap)
{
	struct stat st;

	if (mkdir(sock_dir, 0700) == -1 && errno != EEXIST) {
		int err = errno;

		snprintf(why, cap, "cannot create the engine socket directory %s: %s",
			 sock_dir, strerror(err));
		return -err;
	}
	if (lstat(sock_dir, &st) == -1) {
		int err = errno;

		snprintf(why, cap, "engine socket directory %s: %s", sock_dir, strerror(err));
		return -err;
	}
	if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077)) {
		snprintf(why, cap,
			 "refusing the engine socket directory %s: it must be a directory owned "
			 "by uid %u with mode 0700 (it is %s, uid %u, mode %04o)",
			 sock_dir, (unsigned)geteuid(), S_ISDIR(st.st_mode) ? "a directory" :
			 S_ISLNK(st.st_mode) ? "a symbolic link" : "not a directory",
			 (unsigned)st.st_uid, (unsigned)(st.st_mode & 07777));
		return -EACCES;
	}
	return 0;
}

static int connect_engine(void)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);

	if (fd == -1)
		return -errno;
	memcpy(sa.sun_path, sock_path, sizeof(sock_path));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == -1) {
		int err = errno;

		close(fd);
		return -err;
	}
	return fd;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000 };

	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

/* What a spawned engine said instead of "ok" (its startup error). */
static char engine_error[512];

static void exec_front(char *launcher, int argc, char **argv);

/**
 * spawn_engine() - start `spliceproxy engine` detached from this process.
 *
 * Double fork and setsid: the engine must outlive this stub (dockerd's
 * parent-death signal and its process group are the stub's alone) and must
 * not be its child.  Its stdio is /dev/null so it holds none of our pipes;
 * its fd 3 is a pipe on which it says "ok" once it serves, or why it cannot
 * (returned by engine_ready()).  Returns the pipe's read end or -errno.
 */
static int spawn_engine(void)
{
	char launcher[PATH_MAX];
	char *args[7];
	int ready[2];
	pid_t pid;
	int status, rc;

	rc = launcher_path(launcher, sizeof(launcher));
	if (rc < 0)
		return rc;
	if (pipe2(ready, O_CLOEXEC) == -1)
		return -errno;
	args[0] = launcher;
	args[1] = "engine";
	args[2] = "--socket";
	args[3] = sock_path;
	args[4] = "--ready-fd";
	args[5] = "3";
	args[6] = NULL;
	pid = fork();
	if (pid == -1) {
		rc = -errno;
		close(ready[0]);
		close(ready[1]);
		return rc;
	}
	if (pid == 0) {
		sigset_t none;

		setsid();
		if (fork() != 0)
			_exit(0);
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		rc = open("/dev/null", O_RDWR);
		if (rc >= 0) {
			dup2(rc, 0);
			dup2(rc, 1);
			dup2(rc, 2);
			if (rc > 2)
				close(rc);
		}
		/* Replaces dockerd's status pipe: the engine must not hold it. */
		dup2(ready[1], 3);
		close(LISTEN_FD);
		/* Without the launcher's shell part, as every other command. */
		exec_front(launcher, 6, args);
		/* Said on the ready pipe, so the stub can tell dockerd why. */
		dprintf(3, "cannot run %s: %s; " REINSTALL_HINT, launcher, strerror(errno));
		_exit(127);
	}
	close(ready[1]);
	while (waitpid(pid, &status, 0) == -1 && errno == EINTR)
		;
	return ready[0];
}

/* Has the spawned engine answered on its ready pipe?  0: not yet; 1: "ok";
 * -EIO: it failed (engine_error says why); -ESRCH: it ended saying nothing
 * (killed while starting: engine_error says so, for when that repeats). */
static int engine_ready(int fd, int wait_ms)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	char buf[sizeof(engine_error)];
	const char *p;
	ssize_t n;

	if (poll(&pfd, 1, wait_ms) <= 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	if (n >= 2 && !memcmp(buf, "ok", 2))
		return 1;
	if (n < 0)
		n = 0;
	buf[n] = '\0';
	if (n && buf[n - 1] == '\n')
		buf[n - 1] = '\0';
	/* A front end that cannot start at all (a broken install) says so on
	 * its fd 3 as a proxy would, "1\n<msg>": the reason is <msg>. */
	p = n >= 2 && !memcmp(buf, "1\n", 2) ? buf + 2 : buf;
	snprintf(engine_error, sizeof(engine_error), "%s",
		 *p ? p : "it exited without saying why (is the launcher beside the stub?)");
	return *p ? -EIO : -ESRCH;
}

/**
 * engine_connect_or_start() - a connection to the engine, starting it if needed.
 *
 * Under an exclusive lock on <socket>.start, beside the socket: whoever
 * holds it either finds the engine another stub started, or starts it and
 * waits until it accepts.  An engine that ends while starting without a
 * word (killed: an operator's pkill, the OOM killer) is started again, up
 * to SPAWN_TRIES times.  Returns the connected socket or -errno (-EIO:
 * the engine failed to start, engine_error says why).
 */
static int engine_connect_or_start(int64_t deadline)
{
	char lock_path[sizeof(sock_path) + 8];
	int fd, lock, ready = -1, state = 0, spawns = 0;

	fd = connect_engine();
	if (fd >= 0 || (fd != -ENOENT && fd != -ECONNREFUSED))
		return fd;
	snprintf(lock_path, sizeof(lock_path), "%s.start", sock_path);
	lock = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (lock == -1)
		return -errno;
	while (flock(lock, LOCK_EX) == -1) {
		if (errno != EINTR) {
			int err = errno;

			close(lock);
			return -err;
		}
	}
	for (;;) {
		fd = connect_engine();
		if (fd >= 0 || (fd != -ENOENT && fd != -ECONNREFUSED))
			break;
		if (ready < 0 && state == 0) {
			ready = spawn_engine();
			if (ready < 0) {
				fd = ready;
				break;
			}
			spawns++;
		}
		if (now_ms() >= deadline) {
			fd = -ETIMEDOUT;
			break;
		}
		if (ready >= 0 && state == 0) {
			state = engine_ready(ready, 5);
			if (state == -ESRCH && spawns < SPAWN_TRIES) {
				close(ready);
				ready = -1;
				state = 0;
				continue;
			}
			if (state < 0) {
				fd = -EIO;
				break;
			}
		} else {
			sleep_ms(5);
		}
	}
	if (ready >= 0)
		close(ready);
	close(lock);  /* releases the lock */
	return fd;
}

/* Append one field (tag character, text, NUL) to msg_buf at *len. */
static int put_field(size_t *len, char tag, const char *text)
{
	size_t n = strlen(text);

	if (*len + n + 2 + (tag ? 1 : 0) > sizeof(msg_buf))
		return -E2BIG;
	if (tag)
		msg_buf[(*len)++] = tag;
	memcpy(msg_buf + *len, text, n + 1);
	*len += n + 1;
	return 0;
}

/**
 * build_request() - a "map" or "adopt" request in msg_buf.
 *
 * Fields: the command, then 'a'+argument for each argv word, 'e'+NAME=VALUE
 * for each SPLICEPROXY_* variable, 'd'+role for each passed descriptor, in
 * the order of the SCM_RIGHTS array.
 */
static ssize_t build_request(const char *cmd, int argc, char **argv, const char *const *roles,
			     int nroles)
{
	size_t len = 0;
	char **env;
	int i;

	if (put_field(&len, 0, cmd))
		return -E2BIG;
	for (i = 0; i < argc; i++)
		if (put_field(&len, 'a', i == 0 && argv0 ? argv0 : argv[i]))
			return -E2BIG;
	for (env = environ; *env; env++)
		if (!strncmp(*env, ENV_PREFIX, sizeof(ENV_PREFIX) - 1) && put_field(&len, 'e', *env))
			return -E2BIG;
	for (i = 0; i < nroles; i++)
		if (put_field(&len, 'd', roles[i]))
			return -E2BIG;
	return (ssize_t)len;
}

static int send_msg(int sock, const char *buf, size_t len, const int *fds, int nfds)
{
	char cbuf[CMSG_SPACE(sizeof(int) * 8)];
	struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *cm;

	if (nfds) {
		memset(cbuf, 0, sizeof(cbuf));
		mh.msg_control = cbuf;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		cm = CMSG_FIRSTHDR(&mh);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
	}
	while (sendmsg(sock, &mh, MSG_NOSIGNAL) == -1) {
		if (errno != EINTR)
			return -errno;
	}
	return 0;
}

/* Receive one message; *fd gets the first passed descriptor (others are
 * closed), or -1.  Returns its length, 0 at EOF, or -errno. */
static ssize_t recv_msg(int sock, char *buf, size_t cap, int *fd)
{
	char cbuf[CMSG_SPACE(sizeof(int) * 8)];
	struct iovec iov = { .iov_base = buf, .iov_len = cap - 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm;
	ssize_t n;

	*fd = -1;
	do
		n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
	while (n == -1 && errno == EINTR);
	if (n == -1)
		return -errno;
	for (cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
		if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
			int k, nfds = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			int got[8];

			memcpy(got, CMSG_DATA(cm), sizeof(int) * (size_t)nfds);
			for (k = 0; k < nfds; k++) {
				if (*fd == -1)
					*fd = got[k];
				else
					close(got[k]);
			}
		}
	}
	buf[n] = '\0';
	return n;
}

/* A SIGHUP arrived (logrotate): the log file is to be opened again. */
static int hup_pending;

/* Has a stop signal (SIGINT, SIGTERM) arrived?  Drains the signalfd; a
 * SIGHUP only sets hup_pending (in standalone mode it reopens the log, and
 * its default action would end this stub and its mapping with it). */
static int stop_signalled(void)
{
	struct signalfd_siginfo si;

	while (read(sig_fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		if (si.ssi_signo != SIGHUP)
			return 1;
		hup_pending = 1;
	}
	return 0;
}

enum reply { REPLY_OK, REPLY_EXIT, REPLY_ERROR, REPLY_LOST, REPLY_SIGNAL, REPLY_TIMEOUT };

/* An "exit" reply's code: decimal 0 to 255; anything else is a failure, 1
 * (the engine is not trusted to say something sensible). */
static int exit_code(const char *text)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(text, &end, 10);
	if (errno || end == text || *end || v < 0 || v > 255)
		return 1;
	return (int)v;
}

/**
 * wait_reply() - wait for the engine's answer to a request.
 * @code: REPLY_EXIT: the exit code; REPLY_OK: the passed descriptor, or -1
 *
 * Also returns REPLY_SIGNAL when a stop signal arrives first, REPLY_TIMEOUT at
 * deadline (the engine hangs), and REPLY_LOST when the
 * engine hung up (it died or was exiting): the caller then tries again.
 */
static enum reply wait_reply(int sock, int *code, char *text, size_t text_cap, int64_t deadline)
{
	struct pollfd p[2] = { { .fd = sock, .events = POLLIN }, { .fd = sig_fd, .events = POLLIN } };
	char buf[1024];
	ssize_t n;
	int fd;

	for (;;) {
		int64_t left = deadline - now_ms();

		if (left <= 0)
			return REPLY_TIMEOUT;
		if (poll(p, 2, (int)left) == -1) {
			if (errno == EINTR)
				continue;
			return REPLY_LOST;
		}
		if (p[1].revents && stop_signalled())
			return REPLY_SIGNAL;
		if (!p[0].revents)
			continue;
		n = recv_msg(sock, buf, sizeof(buf), &fd);
		if (n <= 0)
			return REPLY_LOST;
		if (!strcmp(buf, "ok")) {
			*code = fd;
			return REPLY_OK;
		}
		if (fd >= 0)
			close(fd);
		if (!strcmp(buf, "exit") && (size_t)n > sizeof("exit")) {
			/* "exit", the code, and for a startup failure its text. */
			const char *c = buf + sizeof("exit");
			size_t k = strlen(c) + 1;

			*code = exit_code(c);
			text[0] = '\0';
			if ((size_t)(c - buf) + k < (size_t)n) {
				size_t m = strnlen(c + k, text_cap - 1);

				memcpy(text, c + k, m);  /* truncated to fit, on purpose */
				text[m] = '\0';
			}
			return REPLY_EXIT;
		}
		if (!strcmp(buf, "error")) {
			const char *why = (size_t)n > sizeof("error") ? buf + sizeof("error")
								 : "refused";
			size_t k = strnlen(why, text_cap - 1);

			memcpy(text, why, k);  /* truncated to fit, on purpose */
			text[k] = '\0';
			return REPLY_ERROR;
		}
		/* Anything else is not for this state; keep waiting. */
	}
}

/**
 * stop() - the mapping ends: have the engine close the listener, then exit 0.
 *
 * Only once the engine has removed it is the port free for dockerd to bind
 * again (container restart); STOP_WAIT_MS bounds the wait if it hangs.
 */
static void __attribute__((noreturn)) stop(int sock, int listen_fd)
{
	struct pollfd p = { .fd = sock, .events = POLLIN };
	int64_t deadline = now_ms() + STOP_WAIT_MS;
	char buf[256];
	int fd;

	if (sock >= 0 && send_msg(sock, "remove", sizeof("remove"), NULL, 0) == 0) {
		for (;;) {
			int64_t left = deadline - now_ms();
			ssize_t n;

			if (left <= 0)
				break;
			if (poll(&p, 1, (int)left) <= 0) {
				if (errno == EINTR)
					continue;
				break;
			}
			n = recv_msg(sock, buf, sizeof(buf), &fd);
			if (fd >= 0)
				close(fd);
			if (n <= 0 || !strcmp(buf, "removed"))
				break;
		}
	}
	close(listen_fd);
	_exit(0);
}

/**
 * adopt() - register our listener with a (new) engine after the old one died.
 *
 * Retries until it succeeds; a stop signal meanwhile ends the stub (the
 * engine is gone, so nothing else holds the port).  Returns the connection.
 */
static int adopt(int argc, char **argv, int listen_fd, int log_fd)
{
	static const char *const roles_log[] = { "listen", "netns", "log" };
	int fds[3] = { listen_fd, netns_fd, log_fd };
	int backoff = 0;
	char text[512];

	for (;;) {
		int sock, code;
		ssize_t len;
		enum reply r;

		if (backoff) {
			struct pollfd p = { .fd = sig_fd, .events = POLLIN };

			if (poll(&p, 1, backoff) > 0 && stop_signalled())
				stop(-1, listen_fd);
		} else if (stop_signalled()) {
			stop(-1, listen_fd);
		}
		backoff = backoff ? (backoff < 200 ? backoff * 2 : 200) : 5;
		sock = engine_connect_or_start(now_ms() + START_WAIT_MS);
		if (sock < 0)
			continue;
		len = build_request("adopt", argc, argv, roles_log, log_fd >= 0 ? 3 : 2);
		if (len < 0 || send_msg(sock, msg_buf, (size_t)len, fds, log_fd >= 0 ? 3 : 2)) {
			close(sock);
			continue;
		}
		r = wait_reply(sock, &code, text, sizeof(text), now_ms() + START_WAIT_MS);
		if (r == REPLY_OK) {
			if (code >= 0)
				close(code);
			return sock;
		}
		close(sock);
		if (r == REPLY_SIGNAL)
			stop(-1, listen_fd);
		if (r == REPLY_EXIT || r == REPLY_ERROR) {
			/* Refused: this mapping cannot be served any more. */
			write_all(2, "spliceproxy: the engine refused the mapping again\n", 50);
			close(listen_fd);
			_exit(1);
		}
	}
}

/**
 * drop_capabilities() - hold only what serving the mapping needs.
 * @keep: mask of the capabilities (below 32) to keep, effective and permitted
 *
 * Once the engine serves the mapping, this process only waits: on the
 * engine's connection, whose messages it parses (from an engine that runs
 * as an unprivileged user), and on signals.  All it may still do with
 * privilege is reopen SPLICEPROXY_LOG_FILE on SIGHUP with dockerd's rights
 * (CAP_DAC_OVERRIDE, kept only when that variable is set), so the other
 * capabilities go from every set but the bounding one.  Started as root it
 * stays uid 0: the control socket's directory is root's alone (0700), and
 * an engine it starts after the old one died must start as root, which its
 * exec regains within the bounding set, kept as it is.
 */
static void drop_capabilities(uint32_t keep)
{
	struct __user_cap_header_struct hdr = { .version = _LINUX_CAPABILITY_VERSION_3 };
	struct __user_cap_data_struct caps[_LINUX_CAPABILITY_U32S_3];

	memset(caps, 0, sizeof(caps));
	if (geteuid() == 0) {
		caps[0].effective = keep;
		caps[0].permitted = keep;
	}
	/* Lowering cannot fail for want of privilege; a kernel without ambient
	 * capabilities (before 4.3) has none to clear. */
	prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
	syscall(SYS_capset, &hdr, caps);
}

/* Go's strconv.ParseBool true values, as settings.boolean() takes them. */
static int go_true(const char *v)
{
	static const char *const words[] = { "1", "t", "T", "TRUE", "true", "True" };
	size_t i;

	for (i = 0; i < sizeof(words) / sizeof(words[0]); i++)
		if (!strcmp(v, words[i]))
			return 1;
	return 0;
}

/* What a file mode is, in the standalone proxy's words (files.py). */
static const char *file_kind(mode_t mode)
{
	switch (mode & S_IFMT) {
	case S_IFIFO: return "a FIFO";
	case S_IFCHR: return "a character device";
	case S_IFBLK: return "a block device";
	case S_IFSOCK: return "a socket";
	case S_IFDIR: return "a directory";
	case S_IFLNK: return "a symbolic link";
	default: return "not a regular file";
	}
}

/**
 * open_log() - open SPLICEPROXY_LOG_FILE for appending, as the standalone proxy does.
 * @path: the file
 * @why:  the reason, when it is refused
 *
 * Opened here as root (dockerd's privileges), so the rules are
 * src/spliceproxy/files.py's, with its wording: the path is walked one
 * component at a time with O_NOFOLLOW (a symbolic link anywhere is refused,
 * not followed), anything but a regular file is refused before and after
 * the open (which is O_NONBLOCK: a FIFO never hangs us before fd 3 is
 * answered), a new file is 0600, and a file owned by anyone but root or us,
 * or with more than one hard link, is refused.  Returns the descriptor or -1.
 */
static int open_log(const char *path, char *why, size_t cap)
{
	char walked[PATH_MAX], name[NAME_MAX + 1];
	const char *p = path, *end;
	struct stat st;
	size_t wlen = 0;
	int dfd, fd;

	dfd = open(*path == '/' ? "/" : ".", O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0) {
		snprintf(why, cap, "%s: %s", *path == '/' ? "/" : ".", strerror(errno));
		return -1;
	}
	walked[0] = '\0';
	for (;;) {
		size_t n;

		while (*p == '/')
			p++;
		end = strchr(p, '/');
		n = end ? (size_t)(end - p) : strlen(p);
		if (n == 1 && *p == '.') {
			p += n;
			continue;
		}
		if (!n) {
			snprintf(why, cap, "%s: not a file name", path);
			goto refused;
		}
		if (n > NAME_MAX || wlen + n + 2 > sizeof(walked)) {
			snprintf(why, cap, "%s: %s", path, strerror(ENAMETOOLONG));
			goto refused;
		}
		memcpy(name, p, n);
		name[n] = '\0';
		p += n;
		while (*p == '/')
			p++;
		if (!*p)
			break;  /* name is the file itself */
		if (wlen || *path == '/')
			walked[wlen++] = '/';
		memcpy(walked + wlen, name, n + 1);
		wlen += n;
		if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) == -1) {
			snprintf(why, cap, "%s: %s", walked, strerror(errno));
			goto refused;
		}
		if (!S_ISDIR(st.st_mode)) {
			snprintf(why, cap, "%s is %s, not a directory (symbolic links are not "
				 "followed; give the real path)", walked, file_kind(st.st_mode));
			goto refused;
		}
		fd = openat(dfd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (fd == -1) {
			snprintf(why, cap, "%s: %s", walked, strerror(errno));
			goto refused;
		}
		close(dfd);
		dfd = fd;
	}
	if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISREG(st.st_mode)) {
		snprintf(why, cap, "%s is %s, not a regular file", path, file_kind(st.st_mode));
		goto refused;
	}
	fd = openat(dfd, name, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_NONBLOCK |
		    O_NOCTTY | O_CLOEXEC, 0600);
	if (fd == -1) {
		snprintf(why, cap, "%s: %s", path, strerror(errno));
		goto refused;
	}
	close(dfd);
	if (fstat(fd, &st) == -1) {
		snprintf(why, cap, "%s: %s", path, strerror(errno));
	} else if (!S_ISREG(st.st_mode)) {
		snprintf(why, cap, "%s is %s, not a regular file", path, file_kind(st.st_mode));
	} else if (st.st_uid != 0 && st.st_uid != geteuid()) {
		if (geteuid() == 0)
			snprintf(why, cap, "%s is owned by uid %u, not by root", path,
				 (unsigned)st.st_uid);
		else
			snprintf(why, cap, "%s is owned by uid %u, not by root or uid %u", path,
				 (unsigned)st.st_uid, (unsigned)geteuid());
	} else if (st.st_nlink > 1) {
		snprintf(why, cap, "%s has %lu hard links (a link to another file?)", path,
			 (unsigned long)st.st_nlink);
	} else {
		return fd;
	}
	close(fd);
	return -1;
refused:
	close(dfd);
	return -1;
}

/* One line in the log file, in the front end's format (log.py). */
static void log_line(int fd, const char *msg)
{
	char line[PATH_MAX + 512];
	time_t now = time(NULL);
	struct tm tm;
	int n;

	localtime_r(&now, &tm);
	n = snprintf(line, sizeof(line), "%04d/%02d/%02d %02d:%02d:%02d %s\n", tm.tm_year + 1900,
		     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, msg);
	if (n > 0)
		write_all(fd, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
}

/**
 * reopen_log() - SIGHUP: open the log file's path again and give it to the engine.
 * @sock:   the control connection
 * @log_fd: our descriptor of the current file, replaced by the new one
 *
 * As the standalone proxy does for logrotate; opened here, with dockerd's
 * privileges and the same rules, because the engine dropped its own.  A
 * failure keeps the current file and says why in it.  Without a log file
 * (stderr) there is nothing to reopen.
 */
static void reopen_log(int sock, int *log_fd)
{
	const char *path = getenv(ENV_PREFIX "LOG_FILE");
	char why[PATH_MAX + 256], msg[sizeof(why) + PATH_MAX + 64];
	size_t len = 0;
	int fd;

	if (!path || !*path || *log_fd < 0)
		return;
	fd = open_log(path, why, sizeof(why));
	if (fd < 0) {
		snprintf(msg, sizeof(msg), "cannot reopen log file %s: %s; still writing to the "
			 "old one", path, why);
		log_line(*log_fd, msg);
		return;
	}
	if (put_field(&len, 0, "log") || put_field(&len, 'd', "log") ||
	    send_msg(sock, msg_buf, len, &fd, 1) < 0) {
		close(fd);
		return;
	}
	close(*log_fd);
	*log_fd = fd;
}

/**
 * engine_wanted() - is this a proxy command line to hand to the engine?
 *
 * Engine mode is the default: yes unless SPLICEPROXY_ENGINE says otherwise,
 * when the first argument is a flag (dockerd never passes anything else
 * first; subcommands such as `status` are not flags) and none asks for the
 * usage or the version.  A Go false means
 * standalone; a value that is no Go boolean goes to the standalone front end
 * too, which refuses it on fd 3 as it refuses every bad setting, so the
 * message and its wording have one source (settings.py).  This is the one
 * place that decides: the stub is the installed `spliceproxy` that dockerd
 * runs, so an engine-mode port costs no shell and no interpreter; everything
 * else is exec'd to the Python front end.
 */
static int engine_wanted(int argc, char **argv)
{
	const char *v = getenv(ENV_PREFIX "ENGINE");
	int i;

	if (v && *v && !go_true(v))
		return 0;
	if (argc < 2 || argv[1][0] != '-')
		return 0;
	/* -h and -v print and exit (the front end words them alike): no
	 * engine is started for them.  Flags as Go reads them: - or --, up to
	 * the first word that is none or "--".  It need not be exact: the front
	 * end and the engine answer any command line alike, this only spares
	 * starting an engine. */
	for (i = 1; i < argc; i++) {
		const char *a = argv[i], *name, *eq;
		size_t n;

		if (a[0] != '-' || !a[1] || !strcmp(a, "--"))
			break;
		name = a + (a[1] == '-' ? 2 : 1);
		eq = strchr(name, '=');
		n = eq ? (size_t)(eq - name) : strlen(name);
		if ((n == 1 && name[0] == 'h') || (n == 4 && !strncmp(name, "help", 4)))
			return 0;
		if (((n == 1 && name[0] == 'v') || (n == 7 && !strncmp(name, "version", 7))) &&
		    (!eq || go_true(eq + 1)))
			return 0;
		/* Every other docker-proxy flag but -use-listen-fd takes a value,
		 * the next word when not given with "=". */
		if (!eq && !(n == 13 && !strncmp(name, "use-listen-fd", 13)))
			i++;
	}
	return 1;
}

/**
 * exec_front() - exec the launcher, skipping its shell part when possible.
 *
 * What the shell part does first (about 0.9 ms of start-up) is find the
 * interpreter beside it: when <dir>/python3 is there, run it the same way
 * the shell would, `python3 -I -S <launcher> args...`.  Anything else (no
 * such interpreter: the build's fallback, the broken-install message) is
 * the launcher's to handle.  Returns only if the launcher cannot be run.
 */
static void exec_front(char *launcher, int argc, char **argv)
{
	char py[PATH_MAX];
	char **args;
	size_t n = strrchr(launcher, '/') - launcher;
	int i;

	if (n + sizeof("/python3") <= sizeof(py)) {
		memcpy(py, launcher, n);
		strcpy(py + n, "/python3");
		args = calloc((size_t)argc + 4, sizeof(*args));
		if (args && access(py, X_OK) == 0 && access(launcher, R_OK) == 0) {
			args[0] = py;
			args[1] = "-I";
			args[2] = "-S";
			args[3] = launcher;
			for (i = 1; i < argc; i++)
				args[i + 3] = argv[i];
			execve(py, args, environ);
		}
		free(args);
	}
	argv[0] = launcher;
	execve(launcher, argv, environ);
}

/* Run the Python front end in this process, with the same arguments and fds
 * (and signals, when why is NULL: nothing was changed yet).  @why: the
 * reason a command line meant for the engine is served standalone. */
static void __attribute__((noreturn)) standalone(int argc, char **argv, const char *why)
{
	char launcher[PATH_MAX];
	char msg[PATH_MAX + 256];
	const char *name = shown_name(argv[0]);

	if (launcher_path(launcher, sizeof(launcher)) == 0) {
		if (why) {
			/* Undo what main() set up, fds 3 and 4 as inherited; and
			 * the front end serves the port itself. */
			sigset_t set;

			if (have_status)
				fcntl(STATUS_FD, F_SETFD, 0);
			else
				close(STATUS_FD);
			if (have_listen)
				fcntl(LISTEN_FD, F_SETFD, 0);
			else
				close(LISTEN_FD);
			setenv(ENV_PREFIX "ENGINE", "0", 1);
			setenv(WHY_ENV, why, 1);
			sigemptyset(&set);
			sigaddset(&set, SIGINT);
			sigaddset(&set, SIGTERM);
			sigaddset(&set, SIGHUP);
			sigprocmask(SIG_UNBLOCK, &set, NULL);
		}
		setenv(PROG_ENV, name, 1);
		exec_front(launcher, argc, argv);
	}
	snprintf(msg, sizeof(msg), "cannot start the standalone proxy %s: %s; " REINSTALL_HINT,
		 launcher, strerror(errno));
	fail(msg);
}

/* What a map request carries beside argv and the environment: descriptors
 * with their roles (control.py: FD_ROLES), and the log file among them. */
struct passed {
	const char *roles[6];
	int fds[6];
	int n;
	int log_fd;
};

/* Failure texts: static, so their pages are touched only when something
 * fails (a port's private memory is what the stub's start-up touched). */
static char text[1000], msg[1200];

static void pass_fd(struct passed *p, const char *role, int fd)
{
	p->roles[p->n] = role;
	p->fds[p->n++] = fd;
}

/**
 * prepare() - everything before the engine: descriptors, signals, the socket
 * @p: filled with what the map request passes
 *
 * Marks fds 3 and 4 close-on-exec (as docker-proxy 28+), blocks the stop
 * signals into sig_fd, finds this namespace's control socket and checks its
 * directory, and opens SPLICEPROXY_LOG_FILE with dockerd's privileges (the
 * engine drops its own).  Where no control socket is possible the port is
 * served standalone instead, and its log says why; nothing else returns.
 */
static void prepare(int argc, char **argv, struct passed *p)
{
	const char *log_path;
	sigset_t set;
	int i;

	/* Flag errors and usage name the command as the front end would.  A
	 * copy: our own command line (ps, /proc) stays as it was. */
	argv0 = shown_name(argv[0]);
	if (have_status)
		fcntl(STATUS_FD, F_SETFD, FD_CLOEXEC);
	have_listen = fd_is_open(LISTEN_FD);
	if (have_listen) {
		fcntl(LISTEN_FD, F_SETFD, FD_CLOEXEC);
		pass_fd(p, "4", LISTEN_FD);
	}
	reserve_fd(STATUS_FD);
	reserve_fd(LISTEN_FD);

	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	sigprocmask(SIG_BLOCK, &set, NULL);
	sig_fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sig_fd == -1)
		fail("signalfd failed");

	i = resolve_socket();
	if (i == -ENOENT)
		standalone(argc, argv, "no control socket: not root, and XDG_RUNTIME_DIR is "
			   "not an absolute path (SPLICEPROXY_ENGINE_DIR names a directory)");
	if (i == -ENAMETOOLONG)
		standalone(argc, argv, "the engine socket path is too long for a socket "
			   "address (SPLICEPROXY_ENGINE_DIR, SPLICEPROXY_ENGINE_SOCKET)");
	if (i < 0) {
		/* Without /proc this stub could not even start the front end:
		 * a clear failure, never a guess at the engine. */
		snprintf(msg, sizeof(msg), "cannot tell this proxy's network namespace "
			 "(/proc/self/ns/net: %s): the engine it needs is its namespace's",
			 strerror(i == -ENODEV ? ENOENT : -i));
		fail(msg);
	}
	if (check_dir(msg, sizeof(msg)) < 0)
		standalone(argc, argv, msg);

	for (i = 1; i <= 2; i++)
		if (fd_is_open(i))
			pass_fd(p, i == 1 ? "1" : "2", i);
	pass_fd(p, "netns", netns_fd);
	/* fd 3 stays here: the engine answers in its reply, and this stub writes
	 * it.  Passed on, a hung engine would hold dockerd's status pipe open in
	 * an unread message, and dockerd would see no EOF after our failure. */
	p->log_fd = -1;
	log_path = getenv(ENV_PREFIX "LOG_FILE");
	if (log_path && *log_path) {
		static char why[PATH_MAX + 256], lmsg[sizeof(why) + 64];

		p->log_fd = open_log(log_path, why, sizeof(why));
		if (p->log_fd < 0) {
			snprintf(lmsg, sizeof(lmsg),
				 "cannot open log file (SPLICEPROXY_LOG_FILE): %s", why);
			fail(lmsg);
		}
		pass_fd(p, "log", p->log_fd);
	}
}

/**
 * map() - hand the mapping to the engine and get its verdict
 * @sock: the control connection, kept for the mapping's life
 *
 * Starts the engine if none serves the socket, and tries again while the
 * engine goes away before answering (it was exiting idle) until dockerd's
 * deadline nears.  A refusal ends the stub as the standalone proxy would
 * end (the text on fd 3, its exit code).  Returns the listener's duplicate.
 */
static int map(int argc, char **argv, const struct passed *p, int *sock)
{
	int64_t deadline = now_ms() + START_WAIT_MS;
	int code;

	for (;;) {
		ssize_t len;
		enum reply r;

		*sock = engine_connect_or_start(deadline);
		if (*sock == -EIO) {
			snprintf(msg, sizeof(msg), "cannot start the spliceproxy engine for %s: %s",
				 sock_path, engine_error);
			fail(msg);
		}
		if (*sock < 0) {
			if (now_ms() < deadline && *sock != -EACCES && *sock != -EPERM) {
				sleep_ms(20);
				continue;
			}
			snprintf(msg, sizeof(msg), "cannot reach the spliceproxy engine at %s: %s",
				 sock_path, strerror(-*sock));
			fail(msg);
		}
		len = build_request("map", argc, argv, p->roles, p->n);
		if (len < 0)
			fail("command line and environment too long for the engine");
		if (send_msg(*sock, msg_buf, (size_t)len, p->fds, p->n) < 0) {
			close(*sock);
			continue;
		}
		r = wait_reply(*sock, &code, text, sizeof(text), deadline);
		if (r == REPLY_OK) {
			if (code < 0)
				fail("the spliceproxy engine sent no listener");
			return code;
		}
		if (r == REPLY_EXIT && code == 1 && text[0])
			status_failed(text);  /* the engine has logged it */
		if (r == REPLY_TIMEOUT) {
			snprintf(msg, sizeof(msg), "the spliceproxy engine at %s did not answer "
				 "within %d s", sock_path, START_WAIT_MS / 1000);
			fail(msg);
		}
		close(*sock);
		if (r == REPLY_SIGNAL)
			_exit(0);  /* the engine sees the hang-up and drops the mapping */
		if (r == REPLY_EXIT)
			_exit(code);
		if (r == REPLY_ERROR) {
			snprintf(msg, sizeof(msg), "the spliceproxy engine at %s refused: %s",
				 sock_path, text);
			fail(msg);
		}
		if (now_ms() >= deadline)
			fail("the spliceproxy engine went away while starting the mapping");
	}
}

/**
 * serve() - wait for the mapping's end, holding the port
 *
 * Stop signals remove the mapping; SIGHUP reopens the log; an "exit" from
 * the engine (the listener failed) ends the stub as docker-proxy ends; the
 * engine's hang-up (it died) registers the listener with a new one.
 */
static void __attribute__((noreturn)) serve(int argc, char **argv, int sock, int listen_fd,
					    int log_fd)
{
	for (;;) {
		struct pollfd p[2] = { { .fd = sock, .events = POLLIN },
				       { .fd = sig_fd, .events = POLLIN } };
		char buf[256];
		int fd;

		if (poll(p, 2, -1) == -1) {
			if (errno == EINTR)
				continue;
			stop(sock, listen_fd);
		}
		if (p[1].revents && stop_signalled())
			stop(sock, listen_fd);
		if (hup_pending) {
			hup_pending = 0;
			reopen_log(sock, &log_fd);
		}
		if (!p[0].revents)
			continue;
		if (recv_msg(sock, buf, sizeof(buf), &fd) > 0) {
			if (fd >= 0)
				close(fd);
			/* The listener failed after startup: docker-proxy exits then. */
			if (!strcmp(buf, "exit")) {
				close(listen_fd);
				_exit(0);
			}
			continue;  /* nothing else is expected while serving */
		}
		/* The engine is gone: the port stays bound by listen_fd. */
		close(sock);
		sock = adopt(argc, argv, listen_fd, log_fd);
	}
}

int main(int argc, char **argv)
{
	static struct passed passed;
	int sock, listen_fd;

	/* Not for the engine: the front end, untouched (fds 3 and 4 are still
	 * as inherited, no signal is blocked yet). */
	have_status = fd_is_open(STATUS_FD);
	if (argc < 1)
		fail("started with no program name (an empty argv)");
	if (!engine_wanted(argc, argv))
		standalone(argc, argv, NULL);

	prepare(argc, argv, &passed);
	listen_fd = map(argc, argv, &passed, &sock);
	/* Ready: the listener is in the engine.  The engine owns what it needs
	 * of fds 1, 2 and 4; fd 4 is closed before "0\n", so that whoever
	 * reads the verdict finds it closed, as from the standalone proxy (our
	 * own duplicate is listen_fd). */
	close(LISTEN_FD);
	drop_capabilities(passed.log_fd >= 0 ? CAP_TO_MASK(CAP_DAC_OVERRIDE) : 0);
	if (have_status) {
		write_all(STATUS_FD, "0\n", 2);
		close(STATUS_FD);
	}
	serve(argc, argv, sock, listen_fd, passed.log_fd);
}
