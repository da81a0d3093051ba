/* tc_egress.c - tc (clsact) egress entry: sees what the host itself sends,
 * which XDP (ingress only) never does. Shares the tables with XDP, so the
 * replies of a connection that ends on this host land in its entry. */

#define CT_TC_HDR_PULL 128

int ct_tc_egress(struct __sk_buff *skb)
{
	/* Locally built packets can keep headers outside the linear area; make
	 * sure the headers (not the payload) are readable. */
	u32 linear = skb->data_end - skb->data;
	if (linear < CT_TC_HDR_PULL && skb->len > linear)
		bpf_skb_pull_data(skb, skb->len < CT_TC_HDR_PULL ? skb->len : CT_TC_HDR_PULL);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int v = ct_handle(data, data_end, skb->len);
	return v == CT_VERDICT_DROP ? TC_ACT_SHOT : TC_ACT_OK;
}
