/* ctstream.bpf.c - the one translation unit BCC compiles.
 *
 * Programs share maps only within one BCC object, and BCC rewrites map calls
 * (ct4.lookup(...)) and finds programs only in its main text, not in included
 * files. So streamer/datapath/loader.py expands the quoted #includes below (our own
 * files) into one text, with #line markers that keep compiler messages
 * pointing at the real file and line. Angle-bracket includes stay includes.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/pkt_cls.h>

#include "ct_abi.h"
#include "ct_maps.h"
#include "ct_parse.h"
#include "ct_table.h"
#include "ct_logic.h"
#include "syn_cookie.h"

#include "xdp_ingress.c"
#include "tc_egress.c"
#include "tc_ingress.c"
#include "sweeper.c"
#include "early_drop.c"
#include "outbox_ack.c"
#include "migrate_merge.c"
