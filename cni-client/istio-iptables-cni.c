/*
 * istio-iptables-cni: the executable a container runtime runs for the plugin's entry in the conflist.
 *
 * It only carries the request to the node agent (`istio-iptables cni agent`, docs/cni.md) and the answer
 * back: the agent, a warm Python process, runs the plugin's own handling in a forked child, which saves
 * each pod's start the start of an interpreter. It holds none of the plugin's logic: it never reads the
 * JSON and decides nothing. Whenever the agent cannot give a complete answer (no agent file, no socket,
 * refused, cut off, too slow, a request too big to send) it runs the self-contained plugin instead,
 * istio-iptables-cni.d/istio-iptables-cni beside it, with the same environment and standard input: the
 * outcome never depends on the agent, only the time it takes.
 *
 * The agent file, istio-iptables-cni.agent beside this executable (`cni install --agent-socket` writes
 * it): line 1 the agent's unix socket, line 2 (optional) how long to wait for its answer, in milliseconds.
 *
 * The exchange (integers are 32-bit big-endian):
 *   request  "ICN1" env_len stdin_len, then the CNI_* variables as NUL-terminated KEY=VALUE, then stdin
 *   reply    "ICN1" exit_code stdout_len stderr_len, then the plugin's stdout, then its stderr
 * istio_iptables/cni/agent.py is the other end and holds the same constants.
 *
 * Built static by scripts/build-cni-plugin (gcc -static -O2), so the node's C library does not matter.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define BUNDLE "istio-iptables-cni.d/istio-iptables-cni"
#define AGENT_FILE "istio-iptables-cni.agent"
#define MAGIC "ICN1"
#define MAX_ENV (64u * 1024u)
#define MAX_STDIN (4u * 1024u * 1024u)
#define MAX_OUTPUT (4u * 1024u * 1024u)
#define DEFAULT_TIMEOUT_MS 30000L
#define MAX_TIMEOUT_MS 600000L

extern char **environ;

static char self_dir[PATH_MAX];
static char *input;   /* stdin, once read */
static size_t input_len;
static int input_read;

/* The directory of this executable (not of a link to it): the bundle and the agent file are beside it. */
static int find_self_dir(void) {
    ssize_t n = readlink("/proc/self/exe", self_dir, sizeof self_dir - 1);
    if (n <= 0) return -1;
    self_dir[n] = '\0';
    char *slash = strrchr(self_dir, '/');
    if (slash == NULL) return -1;
    *slash = '\0';
    return 0;
}

/* The plugin itself, with stdin as the runtime gave it (or, once read here, the same bytes again). */
static void run_bundle(char **argv) {
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/%s", self_dir, BUNDLE) >= (int)sizeof path) _exit(1);
    if (input_read) {
        int fd = memfd_create("cni-stdin", 0);
        if (fd >= 0) {
            size_t done = 0;
            while (done < input_len) {
                ssize_t n = write(fd, input + done, input_len - done);
                if (n < 0 && errno == EINTR) continue;
                if (n <= 0) break;
                done += (size_t)n;
            }
            if (done == input_len && lseek(fd, 0, SEEK_SET) == 0 && dup2(fd, 0) == 0) {
                close(fd);
                goto exec;
            }
        }
        fprintf(stderr, "istio-iptables-cni: cannot hand the request to %s: %s\n", path, strerror(errno));
        _exit(1);
    }
exec:
    signal(SIGPIPE, SIG_DFL);
    execv(path, argv);
    fprintf(stderr, "istio-iptables-cni: cannot run %s: %s\n", path, strerror(errno));
    _exit(1);
}

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Waits until fd is ready for `events` or the deadline passes; 0 when ready. */
static int wait_for(int fd, short events, long deadline) {
    for (;;) {
        long left = deadline - now_ms();
        if (left <= 0) return -1;
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, (int)left);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        if (p.revents & events) return 0;
        return -1; /* an error or a hang-up without the readiness asked for */
    }
}

static int send_all(int fd, const char *data, size_t len, long deadline) {
    while (len > 0) {
        if (wait_for(fd, POLLOUT, deadline) != 0) return -1;
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static int recv_all(int fd, char *data, size_t len, long deadline) {
    while (len > 0) {
        if (wait_for(fd, POLLIN, deadline) != 0) return -1;
        ssize_t n = recv(fd, data, len, 0);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) return -1; /* EOF before the whole reply: the agent went away */
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static void put_u32(char *at, uint32_t value) {
    at[0] = (char)(value >> 24);
    at[1] = (char)(value >> 16);
    at[2] = (char)(value >> 8);
    at[3] = (char)value;
}

static uint32_t get_u32(const char *at) {
    const unsigned char *u = (const unsigned char *)at;
    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | (uint32_t)u[3];
}

static int write_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The agent file: its socket path and the answer's time limit. -1 when there is none to use. */
static int read_agent_file(struct sockaddr_un *address, long *timeout_ms) {
    char path[PATH_MAX], text[4096];
    if (snprintf(path, sizeof path, "%s/%s", self_dir, AGENT_FILE) >= (int)sizeof path) return -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0) return -1;
    text[n] = '\0';
    char *end = strchr(text, '\n');
    if (end != NULL) *end = '\0';
    size_t len = strlen(text);
    if (len == 0 || len >= sizeof address->sun_path) return -1;
    memset(address, 0, sizeof *address);
    address->sun_family = AF_UNIX;
    memcpy(address->sun_path, text, len);
    *timeout_ms = DEFAULT_TIMEOUT_MS;
    if (end != NULL && end[1] != '\0') {
        char *rest;
        long value = strtol(end + 1, &rest, 10);
        if (value > 0 && value <= MAX_TIMEOUT_MS && (*rest == '\0' || *rest == '\n')) *timeout_ms = value;
    }
    return 0;
}

static int read_stdin(void) {
    size_t capacity = 64 * 1024;
    input = malloc(capacity);
    if (input == NULL) return -1;
    input_read = 1;
    for (;;) {
        if (input_len == capacity) {
            char *bigger = realloc(input, capacity * 2);
            if (bigger == NULL) return -1;
            input = bigger;
            capacity *= 2;
        }
        ssize_t n = read(0, input + input_len, capacity - input_len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) return 0;
        input_len += (size_t)n;
    }
}

/* The exchange with the agent; returns only when its whole reply has been written out (then exits). */
static void ask_agent(int fd, long deadline) {
    size_t env_len = 0;
    for (char **entry = environ; *entry != NULL; entry++)
        if (strncmp(*entry, "CNI_", 4) == 0) env_len += strlen(*entry) + 1;
    if (env_len > MAX_ENV || input_len > MAX_STDIN) return;
    size_t total = 12 + env_len + input_len;
    char *request = malloc(total);
    if (request == NULL) return;
    memcpy(request, MAGIC, 4);
    put_u32(request + 4, (uint32_t)env_len);
    put_u32(request + 8, (uint32_t)input_len);
    char *at = request + 12;
    for (char **entry = environ; *entry != NULL; entry++) {
        if (strncmp(*entry, "CNI_", 4) != 0) continue;
        size_t len = strlen(*entry) + 1;
        memcpy(at, *entry, len);
        at += len;
    }
    memcpy(at, input, input_len);
    int sent = send_all(fd, request, total, deadline);
    free(request);
    if (sent != 0) return;

    char header[16];
    if (recv_all(fd, header, sizeof header, deadline) != 0 || memcmp(header, MAGIC, 4) != 0) return;
    uint32_t code = get_u32(header + 4), out_len = get_u32(header + 8), err_len = get_u32(header + 12);
    if (code > 255 || out_len > MAX_OUTPUT || err_len > MAX_OUTPUT) return;
    char *reply = malloc((size_t)out_len + err_len + 1);
    if (reply == NULL || recv_all(fd, reply, (size_t)out_len + err_len, deadline) != 0) return;
    /* The whole answer is here: from now on it is the answer, whatever happens to the agent. */
    close(fd);
    int written = write_all(1, reply, out_len);
    write_all(2, reply + out_len, err_len);
    _exit(written == 0 ? (int)code : 1);
}

int main(int argc, char **argv) {
    (void)argc;
    signal(SIGPIPE, SIG_IGN);
    if (find_self_dir() != 0) {
        fprintf(stderr, "istio-iptables-cni: cannot find its own directory (/proc/self/exe)\n");
        return 1;
    }
    struct sockaddr_un address;
    long timeout_ms;
    if (read_agent_file(&address, &timeout_ms) != 0) run_bundle(argv);
    long deadline = now_ms() + timeout_ms;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) run_bundle(argv);
    /* A unix socket connects at once or not at all (EAGAIN: the agent's backlog is full). */
    if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0) {
        close(fd);
        run_bundle(argv);
    }
    if (read_stdin() == 0) ask_agent(fd, deadline);
    close(fd);
    run_bundle(argv);
    return 1;
}
