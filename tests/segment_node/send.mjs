// Sends every Segment call type through @segment/analytics-node: node send.mjs HOST KEY SPEC_JSON
import { Analytics } from '@segment/analytics-node'

const [host, writeKey, specJson] = process.argv.slice(2)
const { ids, anon, user, timestamp, context } = JSON.parse(specJson)
const analytics = new Analytics({ writeKey, host, flushInterval: 200, maxRetries: 3 })
const errors = []
analytics.on('error', (error) => errors.push(JSON.stringify(error)))
const common = { context, timestamp }
analytics.track({ ...common, userId: user, anonymousId: anon, event: 'Order Completed', properties: { total: 9 }, messageId: ids.t })
analytics.page({ ...common, anonymousId: anon, category: 'Docs', name: 'Home', messageId: ids.p })
analytics.screen({ ...common, userId: user, name: 'Settings', messageId: ids.s })
analytics.identify({ ...common, userId: user, anonymousId: anon, traits: { plan: 'pro' }, messageId: ids.i })
analytics.group({ ...common, userId: user, groupId: 'g1', traits: { seats: 3 }, messageId: ids.g })
analytics.alias({ ...common, userId: user, previousId: anon, messageId: ids.a })
await analytics.closeAndFlush({ timeout: 60000 })
if (errors.length) {
  console.error(errors.join('\n'))
  process.exit(1)
}
