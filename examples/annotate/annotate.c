/*
 * outflow annotation API, from C: tag what a connection sends from now on with a client id.
 *
 * Call it on the accepted socket after reading a request and before writing its response
 * (a server that terminates TLS or speaks HTTP/2 knows the client; outflow cannot see it on
 * the wire). The agent must run with `--annotations` (or `annotations = true` under
 * [attribution]); the id is hashed like header ids unless the agent is told to keep ids raw.
 *
 *   cc -O2 -o annotate-demo annotate.c -DOUTFLOW_ANNOTATE_DEMO
 */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#define SOL_OUTFLOW 0x4f46       /* private level, handled by outflow's cgroup program */
#define OUTFLOW_CLIENT_ID 1      /* value: the client id, at most 256 bytes */

/* 0 on success. Without the agent attached the kernel refuses the level (ENOPROTOOPT):
 * serving must go on, so callers normally ignore the result. */
static int outflow_annotate(int fd, const char *client_id)
{
    size_t len = strlen(client_id);
    if (len > 256)
        len = 256;
    if (setsockopt(fd, SOL_OUTFLOW, OUTFLOW_CLIENT_ID, client_id, (socklen_t)len) != 0)
        return -errno;
    return 0;
}

#ifdef OUTFLOW_ANNOTATE_DEMO
#include <stdio.h>
#include <unistd.h>
int main(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int rc = outflow_annotate(fd, "tenant-42");
    printf("outflow_annotate: %s\n", rc == 0 ? "ok" : strerror(-rc));
    close(fd);
    return 0;
}
#endif
