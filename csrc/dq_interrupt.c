/* Interrupt polling for the core's long loops (see dq_common.h).
 *
 * The hook (installed by the boundary) may only be called from the thread
 * that started the core call, and only that thread's polls count: a worker
 * thread never polls (the flag is per thread), so a loop polls between its
 * parallel chunks, in the calling thread.  The hook itself
 * decides whether its thread can see signals at all. */
#include "dq_common.h"

#include <time.h>

static dq_interrupt_hook_t hook_fn = NULL;
static _Thread_local int pending = 0;
/* Per thread: when this thread last called the hook (ms, monotonic). */
static _Thread_local int64_t last_poll_ms = 0;

void dq_set_interrupt_hook(dq_interrupt_hook_t hook) { hook_fn = hook; }

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int dq_interrupted(void)
{
    if (pending) return 1;
    if (!hook_fn) return 0;
    const int64_t t = now_ms();
    if (t - last_poll_ms < DQ_POLL_MS) return 0;
    last_poll_ms = t;
    if (hook_fn()) {
        pending = 1;
        return 1;
    }
    return 0;
}

int dq_interrupt_take(void)
{
    const int p = pending;
    pending = 0;
    return p;
}
