/* What the emulated CUDA driver and NVML share: how device memory is named
 * and how much of it is in use, node-wide.
 *
 * Device memory is a memfd named "cudaemu:<node>:<device>:<bytes>". Its pages
 * live while any process holds the fd or maps it, as a VMM allocation lives
 * while any process holds a handle or a mapping: so the memory in use on a
 * device is the sum over the distinct such memfds that any process of the
 * node still holds or maps, read from /proc. That is what cuMemGetInfo and
 * nvmlDeviceGetMemoryInfo report, and what cuMemCreate runs out of.
 */
#ifndef TORPOR_EMULATED_H
#define TORPOR_EMULATED_H

#define _GNU_SOURCE
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define EMU_MAX_DEVICES 8
#define EMU_MAX_PIDS 256

static const char *emu_node(void) {
  const char *node = getenv("CUDAEMU_NODE");
  return node && *node ? node : "0";
}

static inline int emu_devices(void) {
  const char *n = getenv("CUDAEMU_DEVICES");
  int count = n ? atoi(n) : 1;
  return count < 0 ? 0 : (count > EMU_MAX_DEVICES ? EMU_MAX_DEVICES : count);
}

static inline unsigned long long emu_total(void) {
  const char *n = getenv("CUDAEMU_MEMORY");
  return n ? strtoull(n, NULL, 10) : (1ULL << 30);
}

/* The 16 bytes of a device's UUID: "GPU-7e57ca5e-0000-4000-8000-0000000000<d>" */
static inline void emu_uuid(int device, unsigned char out[16]) {
  static const unsigned char base[16] = {0x7e, 0x57, 0xca, 0x5e, 0, 0, 0x40, 0,
                                         0x80, 0,    0,    0,    0, 0, 0,    0};
  memcpy(out, base, 16);
  out[4] = (unsigned char)atoi(emu_node());
  out[15] = (unsigned char)device;
}

/* Parse "/memfd:cudaemu:<node>:<device>:<bytes> (deleted)" (or the bare
 * name); 1 if it is one of this node's. */
static inline int emu_parse_on(const char *node, const char *path, int *device,
                        unsigned long long *size) {
  const char *at = strstr(path, "memfd:cudaemu:");
  if (!at) return 0;
  at += strlen("memfd:cudaemu:");
  size_t n = strlen(node);
  if (strncmp(at, node, n) != 0 || at[n] != ':') return 0;
  at += n + 1;
  char *end;
  long d = strtol(at, &end, 10);
  if (*end != ':') return 0;
  unsigned long long s = strtoull(end + 1, &end, 10);
  *device = (int)d;
  *size = s;
  return 1;
}

static inline int emu_parse(const char *path, int *device, unsigned long long *size) {
  return emu_parse_on(emu_node(), path, device, size);
}

struct emu_seen {
  unsigned long long inode;
  int pid;
};

struct emu_scan {
  struct emu_seen *seen; /* (inode, pid) pairs counted so far */
  size_t nseen, cap;
  unsigned long long total; /* each allocation once */
};

/* An allocation of `size` bytes (by inode) that `pid` holds or maps: counted
 * once in the total, and once for that process. */
static inline void emu_count(struct emu_scan *scan, unsigned long long inode, int pid,
                             unsigned long long size, unsigned long long *mine) {
  int known = 0;
  for (size_t i = 0; i < scan->nseen; i++)
    if (scan->seen[i].inode == inode) {
      known = 1;
      if (scan->seen[i].pid == pid) return;
    }
  if (!known) scan->total += size;
  *mine += size;
  if (scan->nseen == scan->cap) {
    scan->cap = scan->cap ? scan->cap * 2 : 64;
    scan->seen = realloc(scan->seen, scan->cap * sizeof *scan->seen);
  }
  scan->seen[scan->nseen++] = (struct emu_seen){inode, pid};
}

/* Bytes in use on `device` (all of them if per_pid is NULL), and per process:
 * pids[i] holds per_pid[i] bytes (the same memory counts for each process
 * holding it, as nvidia-smi shows). */
static inline unsigned long long emu_used_on(const char *node, int device, int *pids,
                                      unsigned long long *per_pid, int *npids) {
  struct emu_scan scan = {NULL, 0, 0, 0};
  int np = 0;
  DIR *proc = opendir("/proc");
  if (!proc) return 0;
  struct dirent *e;
  while ((e = readdir(proc))) {
    int pid = atoi(e->d_name);
    if (pid <= 0) continue;
    unsigned long long mine = 0;
    char path[512], link[512];
    /* fds */
    snprintf(path, sizeof path, "/proc/%d/fd", pid);
    DIR *fds = opendir(path);
    if (fds) {
      struct dirent *f;
      while ((f = readdir(fds))) {
        if (f->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "/proc/%d/fd/%s", pid, f->d_name);
        ssize_t k = readlink(path, link, sizeof link - 1);
        if (k <= 0) continue;
        link[k] = 0;
        int d;
        unsigned long long s;
        struct stat st;
        if (!emu_parse_on(node, link, &d, &s) || d != device || stat(path, &st) != 0) continue;
        emu_count(&scan, st.st_ino, pid, s, &mine);
      }
      closedir(fds);
    }
    /* mappings */
    snprintf(path, sizeof path, "/proc/%d/maps", pid);
    FILE *maps = fopen(path, "r");
    if (maps) {
      char line[1024];
      while (fgets(line, sizeof line, maps)) {
        int d;
        unsigned long long s, inode;
        if (!emu_parse_on(node, line, &d, &s) || d != device) continue;
        if (sscanf(line, "%*s %*s %*s %*s %llu", &inode) != 1) continue;
        emu_count(&scan, inode, pid, s, &mine);
      }
      fclose(maps);
    }
    if (mine && pids && np < EMU_MAX_PIDS) {
      pids[np] = pid;
      per_pid[np] = mine;
      np++;
    }
  }
  closedir(proc);
  free(scan.seen);
  if (npids) *npids = np;
  return scan.total;
}

static inline unsigned long long emu_used(int device, int *pids, unsigned long long *per_pid, int *npids) {
  return emu_used_on(emu_node(), device, pids, per_pid, npids);
}

#endif
