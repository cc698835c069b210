/* LD_PRELOAD shim for user-mode Linux on hosts with a large XSAVE area. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif
#define SLOTS 4096

typedef long (*ptrace_fn)(int, pid_t, void *, void *);
static ptrace_fn real_ptrace;
static size_t host_size;
static struct { void *key; unsigned char *full; } slots[SLOTS];

static unsigned char *slot_for(void *key, int create) {
    size_t h = ((uintptr_t)key >> 4) % SLOTS;
    for (size_t i = 0; i < SLOTS; i++) {
        size_t j = (h + i) % SLOTS;
        if (slots[j].key == key) return slots[j].full;
        if (slots[j].key == NULL) {
            if (!create) return NULL;
            slots[j].key = key;
            slots[j].full = malloc(host_size);
            return slots[j].full;
        }
    }
    return NULL;
}

static long get_full(pid_t pid, unsigned char *buf) {
    struct iovec iov = { buf, host_size };
    return real_ptrace(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &iov);
}

long ptrace(enum __ptrace_request req, ...) {
    va_list ap;
    va_start(ap, req);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if (!real_ptrace) real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    if ((req != PTRACE_GETREGSET && req != PTRACE_SETREGSET) ||
        (uintptr_t)addr != NT_X86_XSTATE)
        return real_ptrace(req, pid, addr, data);
    struct iovec *iov = data;
    if (!host_size) {
        unsigned char *probe = malloc(1 << 16);
        struct iovec p = { probe, 1 << 16 };
        long r = real_ptrace(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &p);
        free(probe);
        if (r < 0) return r;
        host_size = p.iov_len;
    }
    if (iov->iov_len >= host_size) return real_ptrace(req, pid, addr, data);
    unsigned char *full = slot_for(iov->iov_base, 1);
    if (!full) { errno = ENOMEM; return -1; }
    if (req == PTRACE_GETREGSET) {
        long r = get_full(pid, full);
        if (r < 0) return r;
        memcpy(iov->iov_base, full, iov->iov_len);
        return r;
    }
    /* SETREGSET: the caller's short buffer over the full state last read for it. */
    unsigned char *merged = malloc(host_size);
    if (!merged) { errno = ENOMEM; return -1; }
    memcpy(merged, full, host_size);
    static unsigned char zero[64];
    if (memcmp(full + 512, zero, 64) == 0) {      /* never read: take the live state */
        long r = get_full(pid, merged);
        if (r < 0) { free(merged); return r; }
    }
    memcpy(merged, iov->iov_base, iov->iov_len);
    struct iovec fi = { merged, host_size };
    long r = real_ptrace(PTRACE_SETREGSET, pid, (void *)NT_X86_XSTATE, &fi);
    free(merged);
    return r;
}
