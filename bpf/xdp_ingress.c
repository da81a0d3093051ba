/* xdp_ingress.c - XDP entry: tracks every frame received on the interface. */

int ct_xdp_ingress(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	int v = ct_handle(data, data_end, (u32)(data_end - data), ctx->ingress_ifindex, ctx);
	if (v == CT_VERDICT_TX)
		return XDP_TX;
	return v == CT_VERDICT_DROP ? XDP_DROP : XDP_PASS;
}
