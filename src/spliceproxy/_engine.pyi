"""Type stubs for the C relay engine binding."""

RUN_STOPPED: int
RUN_EVENTS: int
RUN_WATCH: int
RUN_TIMEOUT: int
RUN_INTERRUPTED: int

OPT_PIPE_SIZE: int
OPT_PIPE_POOL_MAX: int
OPT_COPY_MODE: int
OPT_COPY_BUF: int
OPT_IDLE_TIMEOUT_MS: int
OPT_UDP_TIMEOUT_MS: int
OPT_UDP_MAX_FLOWS: int
OPT_ACCEPT_BACKOFF_MS: int
OPT_FD_LIMIT: int
OPT_CONNECT_TIMEOUT_MS: int
OPT_UDP_MAX_FLOWS_PER_ADDR: int

COPY_SPLICE: int
COPY_READWRITE: int

EV_CONNECT_FAILED: int
EV_ACCEPT_PAUSED: int
EV_ACCEPT_RESUMED: int
EV_ACCEPT_ERROR: int
EV_UDP_SEND_FAILED: int
EV_UDP_REPLY_FAILED: int
EV_UDP_EVICTED: int
EV_UDP_FLOW_FAILED: int
EV_LISTENER_FAILED: int
EV_IDLE_RECLAIMED: int
EV_HEADROOM_RECLAIMED: int
EV_UDP_ADDR_EVICTED: int

STATS_HEADER_SIZE: int
STATS_VERSION: int
STATS_FLUSH_MS: int

def stat_names() -> tuple[str, ...]: ...
def open_listener(type: int, family: int, addr: bytes, port: int) -> tuple[int, str | None]: ...
def raise_nofile() -> int: ...
def drop_privileges(uid: int, gid: int) -> None: ...
def set_process_name(name: str) -> None: ...

class Engine:
    def __init__(self) -> None: ...
    def close(self) -> None: ...
    def set_stats_fd(self, fd: int) -> None: ...
    def set_option(self, option: int, value: int) -> None: ...
    def add_tcp(self, fd: int, family: int, addr: bytes, port: int) -> int: ...
    def add_udp(self, fd: int, listen_family: int, family: int, addr: bytes, port: int) -> int: ...
    def reserve_pipes(self, n: int) -> int: ...
    def watch(self, fd: int) -> None: ...
    def run(self, timeout_ms: int = -1) -> int: ...
    def stop(self) -> None: ...
    def events(self) -> list[tuple[int, int, int, int]]: ...
    def stats(self) -> dict[str, int]: ...
