/* What an application Pod does with the derived Secret (tests/node, scenario "consumer"):
 * every second, read the mounted `authorization` file afresh and call Tasklist with it.
 *
 *   consumer FILE HOST PORT [TASK]
 *
 * TASK (default "consumer") is the task id in the path called, POST
 * /v1/tasks/TASK/variables/search, so that the stand-in tells several consumers apart.
 * Prints one line per call with the HTTP status only: never the credential. The stand-in
 * Tasklist on the other end records which token each call carried and why it was refused.
 * Built with `gcc -static` into an image of its own; plain HTTP/1.1 over IPv4. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char BODY[] = "{\"pageSize\":1}";

/* Reads the whole file into buffer (at most size-1 bytes); -1 when it cannot. */
static int read_file(const char *path, char *buffer, size_t size) {
    FILE *file = fopen(path, "r");
    if (!file) return -1;
    size_t length = fread(buffer, 1, size - 1, file);
    fclose(file);
    buffer[length] = '\0';
    /* A trailing newline would end the header early. */
    while (length > 0 && (buffer[length - 1] == '\n' || buffer[length - 1] == '\r')) buffer[--length] = '\0';
    return (int)length;
}

/* One call; returns the HTTP status, or 0 when there was no answer. */
static int call(const char *host, int port, const char *task, const char *authorization) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return 0;
    struct timeval timeout = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    struct sockaddr_in address = {0};
    address.sin_family = AF_INET;
    address.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &address.sin_addr) != 1 || connect(fd, (struct sockaddr *)&address, sizeof address) != 0) {
        close(fd);
        return 0;
    }
    static char request[16384];
    int length = snprintf(request, sizeof request,
                          "POST /v1/tasks/%s/variables/search HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: %s\r\n"
                          "Content-Type: application/json\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s",
                          task, host, port, authorization, strlen(BODY), BODY);
    int status = 0;
    if (length > 0 && (size_t)length < sizeof request && write(fd, request, (size_t)length) == length) {
        char answer[64] = {0};
        ssize_t got = read(fd, answer, sizeof answer - 1);
        if (got > 12) sscanf(answer, "HTTP/1.%*d %d", &status);
    }
    close(fd);
    return status;
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: consumer FILE HOST PORT [TASK]\n");
        return 2;
    }
    const char *task = argc == 5 ? argv[4] : "consumer";
    static char authorization[8192];
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (;;) {
        int status = read_file(argv[1], authorization, sizeof authorization) > 0 ? call(argv[2], atoi(argv[3]), task, authorization) : -1;
        printf("%ld status %d\n", (long)time(NULL), status);
        sleep(1);
    }
}
