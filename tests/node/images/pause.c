/* The Pod sandbox's process (containerd's "pause" image): sleeps until it is told to stop.
 * Built with `gcc -static` by the node tests; nothing is pulled from a registry. */
#include <signal.h>
#include <unistd.h>

static void stop(int signal_number) { (void)signal_number; _exit(0); }

int main(void) {
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    for (;;) pause();
}
