/* tc_egress.c - tc (clsact) egress entry: sees what the host itself sends,
 * which XDP (ingress only) never does. Shares the tables with XDP, so the
 * replies of a connection that ends on this host land in its entry. */

int ct_tc_egress(struct __sk_buff *skb)
{
	return ct_handle_skb(skb);
}
