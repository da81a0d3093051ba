/* bare_pass.c - the floor for bench/datapath.py: programs that do nothing
 * but pass the packet. BPF_PROG_TEST_RUN's own cost per run (the loop, the
 * timer, the program call) is all that their figures contain.
 *
 * bare_pass (XDP) is the baseline of every ns/packet figure. bare_cls (tc)
 * is only there to show the wall-clock cost of a test-run syscall with
 * repeat > 1 for a program type that, unlike XDP, does not swap the kernel's
 * XDP dispatcher around the run. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

int bare_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

int bare_cls(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}
