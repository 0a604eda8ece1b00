/* SPDX-License-Identifier: MIT
 *
 * stats.c - what each counter is: its kind and help line, from the one
 * definition in engine.h (SP_STATS_TABLE), for the status and metrics
 * output of the front end.
 */
#include <errno.h>
#include <stddef.h>

#include "engine.h"

#define SP_STAT_SKIP(name)
#define SP_STAT_KIND(kind, help) SP_KIND_##kind,
#define SP_STAT_HELP(kind, help) help,

static const signed char stat_kinds[] = { SP_STATS_TABLE(SP_STAT_SKIP, SP_STAT_KIND) };

static const char *const stat_help[] = { SP_STATS_TABLE(SP_STAT_SKIP, SP_STAT_HELP) };

/* The tables above must be one entry per counter: a D() missing from a
 * line of SP_STATS_TABLE would shift every help line after it. */
_Static_assert(sizeof(stat_kinds) / sizeof(stat_kinds[0]) == SP_STAT_COUNT,
	       "one D(kind, help) per counter in SP_STATS_TABLE");
_Static_assert(sizeof(stat_help) / sizeof(stat_help[0]) == SP_STAT_COUNT,
	       "one D(kind, help) per counter in SP_STATS_TABLE");

int sp_stat_kind(int i)
{
	if (i < 0 || i >= SP_STAT_COUNT)
		return -EINVAL;
	return stat_kinds[i];
}

const char *sp_stat_help(int i)
{
	if (i < 0 || i >= SP_STAT_COUNT)
		return NULL;
	return stat_help[i];
}
