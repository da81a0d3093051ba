/* tc_ingress.c - tc (clsact) ingress entry, the alternative to XDP for
 * connections that end on this host. It runs after GRO, where nf_conntrack
 * also looks: a merged segment is one packet to both, and on a veth it keeps
 * the peer's TSO on (native XDP on a veth turns it off). */

int ct_tc_ingress(struct __sk_buff *skb)
{
	return ct_handle_skb(skb);
}
