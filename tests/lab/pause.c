/* The lab's pause image: holds a pod's namespaces, reaps orphans, exits on SIGTERM or SIGINT (as
 * registry.k8s.io/pause does). Built with gcc -static by tests/lab/images.py. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int signum) {
  (void)signum;
  _exit(0);
}

static void reap(int signum) {
  (void)signum;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction action = {0};
  action.sa_handler = quit;
  sigaction(SIGINT, &action, NULL);
  sigaction(SIGTERM, &action, NULL);
  action.sa_handler = reap;
  action.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  sigaction(SIGCHLD, &action, NULL);
  for (;;) {
    pause();
  }
}
