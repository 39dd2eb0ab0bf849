/* Phase timer of the layer solver: DECOUPLEQ_PROFILE=1 makes dq_solve (and
 * the layer set-up before it) print each phase's wall time to stderr.  A
 * diagnostic only: off, it costs one cached getenv per solve.  Also the
 * core's one monotonic wall clock (dq_wall_seconds), used by the timing
 * routines too. */
#ifndef DQ_PROFILE_H
#define DQ_PROFILE_H

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline int dq_profile_on(void)
{
    const char *e = getenv("DECOUPLEQ_PROFILE");
    return e && *e && *e != '0';
}

static inline double dq_wall_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Seconds since *t0, and restart the clock there. */
static inline double dq_lap_seconds(double *t0)
{
    const double t = dq_wall_seconds(), d = t - *t0;
    *t0 = t;
    return d;
}

/* Print the time since *t0 under `name` (when on) and restart the clock. */
static inline void dq_profile_lap(int on, double *t0, const char *name, int index)
{
    if (!on) return;
    const double d = dq_lap_seconds(t0);
    if (index >= 0)
        fprintf(stderr, "[decoupleq profile] %-16s %d %8.3f s\n", name, index, d);
    else
        fprintf(stderr, "[decoupleq profile] %-18s %8.3f s\n", name, d);
}

#endif
