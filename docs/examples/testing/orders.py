import durable

charges: list[str] = []


async def charge(order_id: str) -> str:
    charges.append(order_id)  # stands for a call to a payment provider
    return f"receipt-{order_id}"


@durable.workflow(queue="orders")
async def fulfill(ctx: durable.Context, order_id: str) -> dict:
    receipt = await ctx.step("charge", charge, order_id)
    await ctx.sleep(24 * 3600)  # a day to change one's mind
    try:
        approval = await ctx.wait_for_event("approved", timeout=6 * 3600)
    except durable.EventTimeout:
        return {"receipt": receipt, "status": "expired"}
    return {"receipt": receipt, "status": "shipped", "by": approval["by"]}
