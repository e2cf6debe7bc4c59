"""Synthetic chest radiographs: the embedded default dataset (``synthetic:N``) that the demo and the
tests train on, so that the whole flow runs without downloading anything.

Labels follow NIH ChestX-ray14 exactly: every image draws its label *set* from the table of the
801 distinct label combinations of the NIH label file (``Data_Entry_2017_v2020.csv``, 112,120 images)
with their counts, so both the label frequencies and their co-occurrence are NIH's. Patients have
several images (NIH's distribution of images per patient, mean 3.6) that share anatomy; views are PA
or AP (AP more often when there is a finding, as in NIH). Each finding is drawn as its own
radiological pattern with random location, size and intensity, on top of a randomly jittered
chest with noise, so that findings are learnable but not trivially so at 64 px.

Image ``i`` depends only on ``(seed, i)`` (and its labels), and its labels only on ``(seed, i,
temperature)``: any subset can be rendered independently, and ``generate(n)`` and ``generate(m)``
agree on their common images. Every random stream draws a fixed number of values whatever the labels,
so :func:`render` can draw the same chest with and without a finding.

Source spec grammar (``synthetic:SPEC``)::

    SPEC  := [N] [ "," KEY "=" VALUE ]*          N: number of images (default 2000)
    KEY   := seed (int >= 0, default 0) | size (pixels, default 64) | temperature (float > 0, default 1)
           | labels (nih14 | chexpert14, default nih14)

e.g. ``synthetic:3000`` or ``synthetic:20000,seed=1,temperature=2``; ``synthetic:`` alone is 2000
images. ``temperature`` > 1 flattens the
combination distribution (probabilities ∝ count^(1/T)) so rare labels appear more often; 1 is faithful.

``labels=chexpert14`` draws CheXpert's joint label distribution instead, over its 14 observations
(``cxrlab.labels.CHEXPERT14``, "No Finding" included as the file has it): the label combinations of the
191,027 frontal images of CheXpert v1.0-small ``train.csv`` with uncertain (-1) → 0 and blank → 0
(U-Zeros, the SPML convention), every combination seen at least 5 times (701 of 1,466; 99.3 % of the
images). CheXpert images carry 2.4 positives on average against NIH's 0.7. Findings with an NIH
counterpart reuse its drawing; Lung Opacity, Support Devices, Enlarged Cardiomediastinum, Fracture and
(half of the time) Pleural Other have their own, and Lung Lesion is a mass or a nodule. Views are AP
with CheXpert's rates (59 % without a finding, 87 % with one).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from ..errors import CxrlabError, closest, unknown
from ..labels import CHEXPERT14, NIH14, NO_FINDING, LabelSpace
from .records import Records

# Distinct NIH label sets and their image counts, "MASK:COUNT" with MASK a hex bit mask over NIH14
# (bit j = NIH14.names[j]; 0 = No Finding). Computed once from Data_Entry_2017_v2020.csv (112,120
# rows); all 801 combinations are kept, so the table is exact.
_NIH_COMBOS = """
0:60361 8:9547 1:4215 4:3955 20:2705 80:2194 10:2139 c:1604 9:1350 100:1310 5:1167 1000:1126 2:1093 400:892
28:829 d:739 800:727 200:628 6:484 108:441 18:420 84:403 14:402 101:398 30:396 208:392 88:347 480:337 104:337
40:322 1004:251 24:250 81:241 1008:210 a:201 21:201 105:200 48:199 204:189 808:185 90:179 11:178 110:151
1020:141 248:138 10c:134 1010:132 a0:130 120:128 20c:127 408:126 e:120 401:117 1001:117 2000:110 41:108 2c:106
801:104 109:104 1c:99 85:99 404:96 8c:88 3:88 240:83 10d:81 1080:79 15:72 89:72 488:72 100c:71 1800:70 7:68
38:67 19:67 410:66 820:66 114:65 34:65 804:59 29:57 481:54 f:54 44:54 300:49 180:49 201:48 1005:47 128:47 484:47
1100:46 1400:46 1009:45 8d:44 25:43 118:42 4c:42 100d:41 102:40 409:40 1d:38 1014:38 115:37 140:36 202:35 209:35
1006:34 49:34 810:34 1084:34 111:34 1024:31 228:31 a8:31 b:31 490:30 1030:30 1028:29 420:29 124:28 220:28 489:27
405:26 1018:25 308:25 20d:24 40c:24 900:24 94:24 130:24 31:24 181:23 218:23 45:23 880:23 22:22 1088:22 184:22
106:22 205:22 3c:22 2d:21 24c:21 2001:21 809:21 188:20 1108:20 4a0:20 500:20 402:19 60:19 244:19 206:18 12:18
1081:18 4d:18 210:18 b0:18 40d:18 102c:17 1808:16 828:16 80c:16 1820:16 101c:16 418:16 121:16 135:16 1101:16
91:16 2008:15 98:15 11c:15 12c:15 2010:15 1200:15 411:15 805:15 1090:15 214:15 485:15 35:15 26:15 141:15 a4:15
16:14 1002:14 1404:13 c00:13 148:13 138:13 13d:13 1480:13 600:13 48c:12 1021:12 10a:12 10f:12 1115:11 1040:11
1104:11 50:11 68:11 2e:11 304:11 830:11 134:11 20e:10 20a:10 1019:10 119:10 103:10 120c:10 884:10 501:10 1110:10
806:10 110c:10 224:10 414:10 b4:10 580:10 ac:10 22c:9 107:9 908:9 58:9 125:9 305:9 82:9 1034:9 1105:9 406:9 a1:9
888:9 9c:9 3d:9 428:8 144:8 42:8 b8:8 581:8 1804:8 821:8 814:8 39:8 1038:8 1801:8 230:8 103c:8 10e:8 46:7 802:7
1408:7 1880:7 1900:7 190:7 2a:7 a9:7 1011:7 13c:7 819:7 185:7 111d:7 1488:6 803:6 1118:6 c8:6 920:6 1120:6 301:6
80a:6 1a0:6 100a:6 10a0:6 2020:6 2f:6 70:6 9d:6 258:6 498:6 1248:6 1089:6 a5:6 249:6 280:6 100f:6 110d:6 1130:6
840:5 440:5 14c:5 818:5 18d:5 18c:5 61:5 508:5 505:5 11d:5 99:5 1025:5 1085:5 424:5 c0:5 100e:5 430:5 1094:5
1015:5 2081:5 2004:5 1410:5 30c:5 140c:5 486:5 c4:4 1405:4 22a:4 104c:4 8a:4 1029:4 17:4 1048:4 30d:4 21c:4
194:4 509:4 10b:4 349:4 149:4 491:4 1007:4 905:4 8e:4 250:4 95:4 1401:4 4a8:4 4a9:4 1910:4 c80:4 2005:4 31c:4
1e:4 129:4 510:4 27:4 51d:4 314:4 101d:4 1489:4 ad:4 1134:4 648:4 2c8:4 10ac:4 416:3 1012:3 1824:3 306:3 24e:3
928:3 1818:3 117:3 302:3 108c:3 145:3 838:3 1420:3 108d:3 24d:3 10a4:3 24a:3 1500:3 229:3 43:3 203:3 811:3 136:3
1810:3 1003:3 80e:3 221:3 1f:3 80d:3 50d:3 499:3 189:3 207:3 142:3 198:3 1888:3 1484:3 901:3 54:3 219:3 234:3
c5:3 212:3 86:3 260:3 5a4:3 1121:3 348:3 1114:3 36:3 1031:3 1119:3 1027:3 1415:3 6c:3 3a:2 482:2 341:2 124c:2
2002:2 2006:2 1208:2 1886:2 264:2 2800:2 449:2 921:2 a00:2 844:2 1240:2 2021:2 48e:2 47:2 1198:2 4a4:2 890:2
139:2 1421:2 3000:2 1481:2 826:2 2c5:2 180e:2 12d:2 131:2 1409:2 1188:2 1148:2 822:2 419:2 1209:2 4a1:2 680:2
2009:2 2018:2 a1c:2 22e:2 103d:2 980:2 1a:2 328:2 51:2 191:2 2100:2 1830:2 10bd:2 1049:2 200c:2 910:2 1102:2
318:2 81d:2 588:2 102d:2 421:2 1091:2 441:2 1307:2 4c0:2 284:2 604:2 2080:2 87:2 225:2 116:2 cc:2 1805:2 30f:2
154:2 82c:2 515:2 8a0:2 1135:2 48d:2 816:2 159:2 105c:2 1026:2 21d:2 5c:2 96:2 10b8:2 1016:2 8f:2 236:2 494:2
111f:2 1098:2 881:2 1128:2 415:2 4a:2 148c:2 493:1 1834:1 a0e:1 8b:1 211:1 868:1 6a:1 384:1 848:1 1b0:1 c34:1
1201:1 4b0:1 28f:1 914:1 690:1 2a0:1 960:1 3014:1 1060:1 448:1 1448:1 1305:1 288:1 3004:1 ca4:1 4ac:1 915:1
909:1 1202:1 807:1 246:1 20b:1 80f:1 1044:1 3c08:1 180c:1 1c0:1 380:1 1238:1 584:1 1a8:1 582:1 827:1 621:1 30a:1
589:1 32:1 c08:1 2011:1 925:1 184c:1 118d:1 81c:1 c91:1 2810:1 151:1 3400:1 2400:1 3c1:1 2801:1 60c:1 122:1
61c:1 2110:1 839:1 2148:1 2044:1 2048:1 220c:1 829:1 c10:1 117c:1 2d8:1 334:1 4c1:1 1803:1 107c:1 118c:1 59:1
235:1 30e:1 1b:1 1184:1 112:1 14f:1 7c:1 1528:1 585:1 658:1 2014:1 1244:1 303:1 514:1 bc:1 1905:1 190d:1 122d:1
344:1 1348:1 1204:1 161:1 1189:1 19d:1 8a9:1 885:1 1d0:1 590:1 278:1 495:1 19c:1 1a5:1 14d:1 882:1 1109:1 4e:1
4d0:1 1bd:1 238:1 41c:1 c09:1 71:1 111e:1 82d:1 1814:1 1086:1 595:1 34d:1 d4:1 112d:1 50c:1 2a06:1 345:1 112f:1
1107:1 d35:1 64:1 540:1 1b1:1 74:1 10b4:1 a38:1 1206:1 200d:1 c11:1 538:1 5e:1 309:1 834:1 25c:1 1511:1 268:1
43c:1 31f:1 1111:1 28c:1 1c90:1 125e:1 c06:1 c94:1 196:1 294:1 1131:1 1017:1 15a8:1 320:1 222:1 200a:1 137:1
2c0:1 aa:1 1136:1 1336:1 110e:1 1106:1 2c10:1 12e:1 2088:1 103e:1 b1:1 1918:1 893:1 1499:1 1491:1 15b1:1 434:1
191d:1 91d:1 317:1 601:1 681:1 824:1 37:1 1807:1 1b5:1 1129:1 33f:1 1117:1 1884:1 c21:1 1424:1 109c:1 18ac:1
83:1 9f:1 1229:1 78:1 13e:1 a18:1 20f:1 1190:1 19bd:1 1138:1 1210:1 113d:1 11a1:1 11b1:1 11bc:1 1c01:1 1828:1
1228:1 1ca1:1 101f:1 245:1 226:1 1b4:1 170:1 42c:1 298:1 62:1 3008:1 220d:1 5a5:1 142c:1 52d:1 1300:1 120f:1
a08:1 2808:1 1181:1 4f:1 1211:1 3001:1 168:1 1306:1 26f:1 295:1 10a8:1 1058:1 c88:1 14a0:1 1809:1 12c8:1 137d:1
61d:1 11e:1 688:1 1180:1 44c:1 1311:1 12c4:1 14b0:1 1414:1 40e:1 4c9:1 591:1 1934:1 241:1 120d:1 111c:1 1418:1
140d:1 148d:1 f0:1 1438:1 187:1 c01:1 ca9:1 1430:1 11f:1 cd:1 2012:1 2028:1 528:1 146:1 14a8:1 10a1:1 160:1
1485:1 150:1 504:1 20b9:1 1191:1
"""

# Label sets of CheXpert v1.0-small train.csv, frontal images only (191,027), U-Zeros (uncertain and blank
# → 0), "MASK:COUNT" with bit j = CHEXPERT14.names[j] (bit 0 = "No Finding", bit 13 = "Support Devices").
# Computed once; the 701 combinations seen at least 5 times are kept (189,656 images, 99.3 %), so rare
# labels are slightly under-represented (Pleural Other by 13 %, Lung Lesion 6 %, the rest < 5 %).
_CHEXPERT_COMBOS = """
2408:12538 1:9553 2008:8987 8:8446 0:7766 2001:7421 2428:6186 408:5972 2000:5278 2028:4196 2400:3838
2020:3675 400:3570 20:3080 2420:2604 2100:2404 428:2329 200:2274 2500:2237 2200:2213 28:2202 2208:1938
2508:1886 242c:1784 2108:1717 100:1716 2608:1645 2520:1579 240c:1579 4:1539 420:1535 2004:1439 1000:1377
108:1313 2024:1308 500:1240 202c:1137 2120:1100 200c:1088 40:1034 2:1025 24:984 2440:982 508:967 2040:967
208:940 2528:881 2424:862 c:844 18:828 440:790 10:782 88:720 42c:716 2448:701 2128:694 608:671 2048:665
240a:656 2600:647 2460:640 40c:624 2002:619 2c:570 2404:564 3000:542 520:530 2300:528 48:517 424:474 600:461
120:457 418:454 1008:447 a:440 200a:427 80:423 2524:415 404:407 2018:386 3408:373 448:361 3008:354 2418:353
2700:345 2010:333 2308:320 528:317 2088:303 242a:301 800:291 40a:286 128:284 2124:277 808:276 2060:273
460:273 300:263 2504:253 410:249 2104:246 1200:235 488:230 6:226 2708:226 2006:224 2468:223 202a:214
1408:212 2228:205 2628:196 250c:190 c0:188 252c:186 2488:185 308:175 2540:173 2402:169 104:164 2808:164
240e:162 2220:162 210c:157 212c:157 20a8:154 524:154 1002:154 a8:154 60:151 2068:148 700:145 2548:145
2022:143 2800:141 1400:140 2410:134 504:133 3208:127 10c:125 3400:124 124:124 2140:122 2422:120 2a:120
402:120 1100:118 210:118 2464:116 148:115 2210:114 22:114 2560:111 3428:111 2080:110 140:108 2102:108
708:106 540:106 2148:106 3200:106 2202:105 2620:105 24a8:101 2502:100 1004:99 210a:98 2240:96 3100:95
2c08:94 468:93 260c:92 4a8:92 1108:91 242e:89 2218:89 250a:88 548:87 52c:86 c8:85 2444:85 218:84 102:84
118:83 188:80 444:79 464:79 2044:79 2640:78 2038:78 a0:77 c08:77 3028:76 42a:76 38:74 518:74 200e:74 50c:74
e:73 2438:72 220c:71 628:71 480:68 228:67 2618:67 220:67 1500:66 44:66 220a:66 58:65 422:65 12c:65 98:63
260a:63 438:62 3508:62 10a:62 202e:62 3020:61 2518:60 2118:60 3500:60 68:60 1020:59 2522:59 1208:59 2204:58
240:57 3004:57 3608:57 3420:56 502:56 3108:56 2248:55 1c:55 620:55 4c0:55 50:54 510:54 1428:54 204c:53
2648:52 40e:52 110:52 3002:52 c00:50 1010:50 2568:49 2026:48 1028:48 2a08:47 818:47 14:45 1a:45 244c:45
1508:45 2058:45 1018:44 2030:43 1608:43 252a:43 2328:43 1800:42 44c:41 4c:41 20c8:41 2064:41 100a:41 498:41
442:40 246c:40 30:39 50a:39 2458:39 640:38 2110:38 20c0:38 8c:38 458:37 41c:36 100c:36 202:36 ac:36 12:36
2588:35 2442:35 64:34 4c8:34 2042:33 180:33 2c00:33 340c:33 26:33 2450:33 2510:33 1300:32 2288:32 3520:32
2610:32 588:32 2122:31 204a:31 42:31 2050:30 2604:30 84:30 244a:30 3440:30 2320:30 300c:30 2426:30 2160:30
450:29 3040:29 2720:29 20ac:29 2828:29 3300:29 2430:29 80c:28 848:28 2188:28 262c:28 2406:27 212a:27 3120:27
41a:26 90:26 1440:26 340a:26 20a:26 1600:26 2a00:25 618:25 430:25 610:25 25a8:24 2168:24 222c:24 302c:24
204:24 46c:24 810:24 2302:24 1024:24 3308:24 20a0:24 2728:24 206c:24 3c:24 24c8:23 122:23 2098:23 908:23
2908:23 840:23 560:23 4ac:23 48c:23 241c:22 1202:22 4a0:22 2224:22 60c:22 220e:22 6c:21 2c28:21 1040:21
2900:21 230a:21 24c0:20 820:20 60a:20 1420:20 1808:20 42e:20 2820:20 568:20 3018:20 5a8:20 342c:20 2e:20
2602:19 2564:19 201c:19 140a:19 2544:19 828:19 a00:19 406:19 241a:19 2310:19 300a:18 21a8:18 1088:18 3800:18
2012:18 248:18 804:18 2c18:18 802:18 24e8:18 2462:18 648:17 280c:17 260e:17 3024:17 203c:17 43c:17 720:17
160:17 888:17 3048:17 2624:17 2304:17 142c:17 412:16 208c:16 4a:16 2480:16 900:16 2206:16 2740:16 2804:16
580:16 2840:16 d00:15 2c40:15 256c:15 250e:15 2138:15 2318:15 20c:15 2260:15 318:15 3424:15 288:15 20e8:15
310:15 522:15 230c:14 2d08:14 1308:14 a08:14 216c:14 1006:14 2014:14 201a:14 254c:14 2538:14 1a8:14 2848:14
3600:14 168:14 c40:13 243c:13 20e0:13 c28:13 248c:13 44a:13 2d00:13 10e:13 80a:13 2558:13 538:13 3460:13
1c8:13 8a:12 106:12 102c:12 54c:12 d08:12 140c:12 24ac:12 4e8:12 2506:12 426:12 120a:12 320:12 4e0:12 1c0:12
602:11 3010:11 254a:11 340:11 446:11 3104:11 c0c:11 112:11 2802:11 2718:11 604:11 320a:11 2062:11 d8:11
3404:11 1c08:11 e08:11 12a:11 2412:11 c0a:11 20e:11 2818:10 3528:10 2c0c:10 1520:10 52a:10 1080:10 1404:10
c18:10 1504:10 270c:10 304:10 2526:10 1418:10 82:10 1048:10 2180:10 2268:10 144:10 1120:10 1448:10 206:10
142:10 2810:10 2340:10 2668:10 328:10 2348:10 3128:10 2126:10 2702:9 1102:9 1424:9 414:9 252e:9 16:9 704:9
14c:9 14a:9 880:9 3448:9 82c:9 54a:9 2e08:9 2688:9 c4:9 214a:9 2084:9 2130:9 aa:9 246a:9 3402:8 688:8 3202:8
3708:8 32:8 740:8 2c20:8 262a:8 2446:8 2106:8 280a:8 2724:8 2470:8 c24:8 2660:8 3088:8 2530:8 434:8 3524:8
2704:8 1700:8 2090:8 544:8 3808:8 158:8 3140:8 302:8 2222:8 1104:8 1402:8 e0:8 2c48:7 352c:7 212e:7 1460:7
222:7 4d0:7 3c08:7 c48:7 2580:7 2748:7 3628:7 1204:7 270a:7 102a:7 138:7 c10:7 2242:7 1e:7 4d8:7 d0:7 3468:7
212:7 214c:7 20aa:7 2b00:6 2880:6 454:6 462:6 824:6 210e:6 248a:6 a4:6 2144:6 51a:6 2542:6 660:6 56c:6
2638:6 484:6 26a8:6 558:6 2788:6 1128:6 598:6 1022:6 702:6 2550:6 3418:6 3700:6 3102:6 2034:6 e8:6 512:6
2258:6 cc:6 43a:6 5c0:6 564:6 728:6 470:6 2070:6 2562:6 24a0:6 62c:5 22c:5 280:5 100e:5 ae:5 21a0:5 164:5
b08:5 24b8:5 30c:5 211c:5 1044:5 490:5 2824:5 8c0:5 718:5 1a0:5 251c:5 150:5 8e:5 238:5 1464:5 350a:5 1410:5
2c04:5 466:5 243a:5 260:5 2642:5 1540:5 550:5 1908:5 2c2c:5 2244:5 90c:5 2414:5 c04:5 52e:5 478:5 748:5
1502:5 4e4:5 2888:5 2360:5 34:5 1488:5 514:5 4b8:5 2d28:5 221c:5 25c8:5 1900:5 2078:5 342a:5 70:5 56a:5
"""
# Positive image counts per CheXpert observation over all 191,027 frontal images (U-Zeros), before
# the truncation above: what the table's frequencies are checked against.
CHEXPERT_FRONTAL_IMAGES = 191027
CHEXPERT_FRONTAL_COUNTS = (16974, 9187, 23385, 94211, 7040, 49675, 12983, 4675, 29720, 17693, 76899, 2505,
                           7436, 107170)

# NIH patients with 1, 2, ..., 30 images; 397 more have over 30 (31..184, mean 51), drawn here
# uniformly in 31..71 so that the mean stays NIH's 3.6 images per patient without 184-image outliers.
_PATIENT_SIZES = (17503, 4113, 2100, 1330, 938, 787, 608, 494, 387, 320, 281, 235, 165, 181, 121, 120, 91,
                  77, 77, 74, 68, 39, 50, 51, 45, 35, 38, 27, 25, 28)
_PATIENTS_OVER_30 = 397
# P(AP | no finding), P(AP | any finding): NIH's; CheXpert's frontal images ("No Finding" is no finding)
_P_AP = {"nih14": {False: 0.349, True: 0.459}, "chexpert14": {False: 0.589, True: 0.872}}
LABEL_SETS = {"nih14": (NIH14, _NIH_COMBOS), "chexpert14": (CHEXPERT14, _CHEXPERT_COMBOS)}

# Independent random streams, so that labels, views, patients and pixels never shift each other.
_LABELS, _VIEWS, _PATIENTS, _ANATOMY, _IMAGE = range(11, 16)
SPEC_KEYS = ("seed", "size", "temperature", "labels")
DEFAULT_N = 2000


# ------------------------------------------------------------------------------------------ labels

def label_set(labels: str) -> LabelSpace:
    """The label space of a synthetic label set name (``nih14`` or ``chexpert14``)."""
    if labels not in LABEL_SETS:
        raise unknown("synthetic label set (labels=)", str(labels), tuple(LABEL_SETS))
    return LABEL_SETS[labels][0]


@lru_cache(maxsize=4)
def combo_table(labels: str = "nih14") -> tuple[np.ndarray, np.ndarray]:
    """(label sets as an n_combos×14 bool matrix, image count of each) of a label set."""
    space, table = label_set(labels), LABEL_SETS[labels][1]
    pairs = [token.split(":") for token in table.split()]
    masks = np.array([int(m, 16) for m, _ in pairs], dtype=np.int64)
    counts = np.array([int(c) for _, c in pairs], dtype=np.int64)
    bits = (masks[:, None] >> np.arange(len(space))) & 1
    return bits.astype(bool), counts


def prevalence(labels: str = "nih14") -> np.ndarray:
    """Per-label image frequency of the embedded table (the expected label means of ``sample_labels``)."""
    sets, counts = combo_table(labels)
    return (sets * counts[:, None]).sum(0) / counts.sum()


def nih_prevalence() -> np.ndarray:
    """NIH's per-label image frequency (the expected label means of ``sample_labels``)."""
    return prevalence("nih14")


def combo_probabilities(temperature: float = 1.0, labels: str = "nih14") -> np.ndarray:
    """Probability of each label combination: ∝ count^(1/temperature)."""
    if not temperature > 0:
        raise CxrlabError(f"synthetic: temperature must be > 0, got {temperature}")
    _, counts = combo_table(labels)
    weights = np.exp(np.log(counts) / temperature)
    return weights / weights.sum()


def sample_labels(n: int, seed: int = 0, temperature: float = 1.0, labels: str = "nih14") -> np.ndarray:
    """N×14 float32 0/1 labels, image ``i``'s set drawn from the combination table of ``labels``."""
    sets, _ = combo_table(labels)
    cdf = np.cumsum(combo_probabilities(temperature, labels))
    u = _rng(seed, _LABELS).random(n)
    index = np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)
    return sets[index].astype(np.float32)


def sample_views(labels: np.ndarray, seed: int = 0, label_names: str = "nih14") -> np.ndarray:
    """"PA" or "AP" per image, AP more likely with a finding (NIH's rates, ~40 % AP overall, or
    CheXpert's, ~84 %)."""
    names = label_set(label_names).names
    finding = np.asarray(labels)[:, [j for j, name in enumerate(names) if name != NO_FINDING]].any(axis=1)
    rates = _P_AP[label_names]
    p_ap = np.where(finding, rates[True], rates[False])
    return np.where(_rng(seed, _VIEWS).random(len(labels)) < p_ap, "AP", "PA")


def sample_patients(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(patient number, follow-up number) per image: consecutive images belong to one patient, with
    NIH's distribution of images per patient."""
    counts = np.array(_PATIENT_SIZES + (_PATIENTS_OVER_30,), dtype=np.float64)
    cdf = np.cumsum(counts / counts.sum())
    u = _rng(seed, _PATIENTS).random((max(n, 1), 2))
    sizes = np.searchsorted(cdf, u[:, 0], side="right") + 1
    big = sizes > len(_PATIENT_SIZES)
    sizes[big] = 31 + (u[big, 1] * 41).astype(np.int64)
    patient = np.repeat(np.arange(len(sizes)), sizes)[:n]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return patient, np.arange(n) - starts[patient]


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


# ------------------------------------------------------------------------------------------ drawing

@dataclass
class _Lung:
    """One lung field: an ellipse (centre cx, cy; half-axes a, b) cut from below by a domed diaphragm
    whose top is at ``base - dome``. ``lateral`` is -1 for the image-left lung, +1 for the right."""

    cx: float
    cy: float
    a: float
    b: float
    base: float
    dome: float
    lateral: int

    def point(self, ux: float, uy: float, top: float = 0.15, bottom: float = 0.9) -> tuple[float, float]:
        """A point inside the lung from two uniforms; ``uy`` spans ``top``..``bottom`` of its height."""
        apex = self.cy - self.b
        y = apex + (top + (bottom - top) * uy) * (self.base - self.dome * 0.5 - apex)
        half = self.a * np.sqrt(max(1.0 - ((y - self.cy) / self.b) ** 2, 0.0)) * 0.75
        return self.cx + (2 * ux - 1) * half, y


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x to the image right, y down)."""
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2 - 1
    return np.meshgrid(t, t)


@lru_cache(maxsize=8)
def _upsampler(size: int, grid: int) -> np.ndarray:
    """size×grid bilinear interpolation matrix: ``U @ noise @ U.T`` is a smooth size×size field."""
    pos = np.clip((np.arange(size) + 0.5) / size * (grid - 1), 0, grid - 1)
    lo = np.minimum(pos.astype(int), grid - 2)
    frac = (pos - lo).astype(np.float32)
    out = np.zeros((size, grid), dtype=np.float32)
    out[np.arange(size), lo] = 1 - frac
    out[np.arange(size), lo + 1] = frac
    return out


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """A soft step: 0 where ``d`` << 0, 1 where ``d`` >> 0, linear over ``width``."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def _radius(x, y, cx, cy, a, b, angle: float = 0.0) -> np.ndarray:
    """Normalised elliptical radius (1 on the ellipse)."""
    dx, dy = x - cx, y - cy
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((dx / a) ** 2 + (dy / b) ** 2)


def _blob(x, y, cx, cy, r) -> np.ndarray:
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (r * r))


class _Chest:
    """The drawing of one image: coordinates, anatomy and the density map findings add to."""

    def __init__(self, size: int, anatomy: np.ndarray, jitter: np.ndarray, noise: np.ndarray, ap: bool):
        self.size, self.px = size, 2.0 / size
        gx, gy = _grid(size)
        angle = (jitter[0] - 0.5) * np.deg2rad(8)
        scale = 0.92 + 0.14 * jitter[1]
        dx, dy = (jitter[2] - 0.5) * 0.16, (jitter[3] - 0.5) * 0.14
        c, s = np.cos(angle), np.sin(angle)
        self.x = ((c * (gx - dx) + s * (gy - dy)) / scale).astype(np.float32)
        self.y = ((-s * (gx - dx) + c * (gy - dy)) / scale).astype(np.float32)
        self.edge = 2.5 * self.px / scale
        up = _upsampler(size, noise.shape[-1])
        self.fields = [up @ f @ up.T for f in noise]          # smooth N(0, ~0.5) fields
        self.a = anatomy
        self.ap = ap
        inspiration = 0.93 if ap else 1.0                     # AP films: supine, shallower breath
        self.heart_scale = (0.86 + 0.2 * anatomy[3]) * (1.08 if ap else 1.0)
        lung_b = (0.56 + 0.08 * anatomy[2]) * inspiration
        lung_a = 0.26 + 0.04 * anatomy[1]
        base = 0.42 + 0.08 * anatomy[5] - (0.05 if ap else 0.0)
        self.lungs = [
            _Lung(-0.41 - 0.03 * anatomy[1], base - lung_b * 0.8, lung_a, lung_b, base, 0.12, -1),
            _Lung(0.41 + 0.03 * anatomy[1], base - lung_b * 0.8 + 0.02, lung_a * 0.95, lung_b, base + 0.03,
                  0.11, +1),
        ]
        self.lung_dark = 0.27 + 0.07 * anatomy[9]
        self.markings = 1.0
        self.mediastinum_extra = 0.0                          # widening (Enlarged Cardiomediastinum)
        self.density = np.zeros_like(self.x)

    def mediastinum(self, extra: float = 0.0) -> np.ndarray:
        """The (upper) mediastinum, widened by ``extra`` on each side."""
        width = 0.09 + 0.03 * self.a[4]
        if extra:
            width = width + extra
        return _ramp(width - np.abs(self.x - 0.02), self.edge) * _ramp(0.2 - self.y, 0.2)

    def layout(self) -> None:
        """Lung fields, their normalised radii and the heart, after findings changed the geometry."""
        self.r, self.masks = [], []
        for lung in self.lungs:
            r = _radius(self.x, self.y, lung.cx, lung.cy, lung.a, lung.b)
            q = np.clip((self.x - lung.cx) / lung.a, -1, 1)
            dome = lung.base - lung.dome * (1 - q * q)
            self.r.append(r)
            self.masks.append(_ramp(1 - r, self.edge / lung.a) * _ramp(dome - self.y, self.edge))
        self.lung = self.masks[0] + self.masks[1]
        s = self.heart_scale
        r = _radius(self.x, self.y, 0.08 + 0.08 * (s - 1), self.lungs[0].base - 0.14 * s, 0.31 * s, 0.21 * s,
                    angle=-0.3)
        self.heart = _ramp(1 - r, self.edge / 0.2)
        hidden = 1 - 0.85 * self.heart                        # lung behind the heart shows little
        if self.mediastinum_extra:                            # a wide mediastinum hides the medial lungs
            hidden = hidden * (1 - 0.85 * self.mediastinum(self.mediastinum_extra))
        self.open_masks = [m * hidden for m in self.masks]
        self.open_lung = self.lung * hidden

    def draw_anatomy(self) -> None:
        """Body, lungs, heart, mediastinum, spine, ribs, clavicles and vessel markings (as density).

        The heart and mediastinum are soft tissue like the rest of the body: they show only where
        they hide the dark lungs, as on a real film."""
        a, x, y = self.a, self.x, self.y
        half_width = 0.84 + 0.1 * a[0]
        body = _ramp(1 - ((x / half_width) ** 4 + ((y - 0.3) / 1.4) ** 4) ** 0.25, 0.04)
        heart = self.heart
        mediastinum = self.mediastinum(self.mediastinum_extra)
        spine = _ramp(0.055 - np.abs(x - 0.01 * (a[6] - 0.5)), self.edge)
        vertebrae = 0.6 + 0.4 * np.cos(2 * np.pi * y / 0.14)
        period = 0.15 + 0.04 * a[7]
        v = y - 0.3 * np.abs(x) + 0.5 * x * x
        ribs = _ramp(np.cos(2 * np.pi * v / period + 6.28 * a[8]) - 0.6, 0.4) * _ramp(0.5 - y, 0.1)
        clavicle = np.exp(-((y + 0.66 - 0.3 * np.abs(x)) / 0.04) ** 2) * _ramp(0.6 - np.abs(x), 0.1)
        hila = _blob(x, y, -0.22, -0.05, 0.22) + _blob(x, y, 0.22, -0.03, 0.2)
        vessels = np.abs(self.fields[0]) * (0.35 + hila) * self.markings
        self.vessels = vessels * self.lung
        self.density += (0.06 + (0.44 + 0.08 * a[10]) * body + 0.06 * mediastinum + 0.07 * spine * vertebrae
                         - self.lung_dark * self.open_lung + 0.04 * heart
                         + 0.06 * ribs * body + 0.1 * clavicle * body + 0.07 * self.vessels)
        if self.ap:  # scapulae project over the lateral upper lungs on AP films
            self.density += 0.05 * _ramp(np.abs(x) - 0.62, 0.1) * _ramp(0.1 - y, 0.2) * body

    def finish(self, look: np.ndarray, pixel_noise: np.ndarray) -> np.ndarray:
        """Global contrast, brightness, gamma and noise: what differs between machines and exposures."""
        img = (self.density - 0.4) * (0.8 + 0.4 * look[0]) + 0.4 + (look[1] - 0.5) * 0.14
        img = np.clip(img, 0.0, 1.0) ** (0.8 + 0.45 * look[2])
        img += (0.01 + 0.025 * look[3]) * pixel_noise
        return np.clip(img, 0.0, 1.0)


# Findings. Each has two parts: ``_SHAPE`` changes the geometry before the lungs are drawn, ``_DRAW``
# adds a density pattern after; both read only their own 12 uniforms ``u``. Every amount goes through
# ``_sev``: u[0] is the severity, and u[11] < FAINT makes the finding faint, nearly invisible, as a
# report-mined label (NIH's are) sometimes is: this keeps the attainable AUC below 1.
FAINT, FAINT_SCALE = 0.15, 0.1


def _sev(u, low: float, high: float) -> float:
    return (low + (high - low) * u[0]) * (FAINT_SCALE if u[11] < FAINT else 1.0)


def _shape_atelectasis(c: _Chest, u) -> None:
    c.lungs[int(u[1] < 0.5)].base -= _sev(u, 0.03, 0.09)          # volume loss: raised hemidiaphragm


def _shape_cardiomegaly(c: _Chest, u) -> None:
    c.heart_scale *= 1 + _sev(u, 0.16, 0.4)


def _shape_emphysema(c: _Chest, u) -> None:
    for lung in c.lungs:                                         # large, hyperinflated, flat domes
        lung.b *= 1 + _sev(u, 0.05, 0.12)
        lung.a *= 1 + _sev(u, 0.03, 0.07)
        lung.base += _sev(u, 0.04, 0.09)
        lung.dome *= 0.3
    c.lung_dark += _sev(u, 0.03, 0.09)
    c.markings *= 1 - _sev(u, 0.5, 0.5)


def _shape_fibrosis(c: _Chest, u) -> None:
    for lung in c.lungs:
        lung.b *= 1 - _sev(u, 0.03, 0.06)


def _draw_atelectasis(c: _Chest, u) -> None:
    lung = c.lungs[int(u[1] < 0.5)]
    px, py = lung.point(u[2], u[3], top=0.55, bottom=0.9)
    angle = (u[4] - 0.5) * 0.7
    half = 0.1 + 0.12 * u[5]
    dx, dy = c.x - px, c.y - py
    along = np.clip(dx * np.cos(angle) + dy * np.sin(angle), -half, half)
    dist = np.hypot(dx - along * np.cos(angle), dy - along * np.sin(angle))
    band = np.exp(-(dist / (0.025 + 0.02 * u[6])) ** 2)
    c.density += _sev(u, 0.12, 0.24) * band * c.open_lung


def _draw_effusion(c: _Chest, u) -> None:
    sides = (0,) if u[1] < 0.4 else (1,) if u[1] < 0.8 else (0, 1)
    for side in sides:
        lung = c.lungs[side]
        level = lung.base - lung.dome - _sev(u, 0.04, 0.29) * (1 if side == sides[0] else u[2])
        lateral = np.clip((c.x - lung.cx) * lung.lateral / lung.a, -1, 1)
        surface = level - (0.04 + 0.1 * u[3]) * (lateral + 1) / 2    # meniscus: higher laterally
        fluid = _ramp(c.y - surface, 0.04 + 0.04 * u[4])
        c.density += _sev(u, 0.2, 0.3) * fluid * c.open_masks[side]


def _patchy(c: _Chest, u, field: np.ndarray, top: float, bottom: float, radius: float, amp: float,
            threshold: float) -> None:
    """Ill-defined opacity: a smooth noise field kept above ``threshold`` inside a blob in one lung
    (or both), for infiltration- and pneumonia-like patterns."""
    sides = (int(u[1] < 0.5),) if u[2] < 0.7 else (0, 1)
    envelope = np.zeros_like(c.x)
    for side in sides:
        px, py = c.lungs[side].point(u[3], u[4], top, bottom)
        envelope += _blob(c.x, c.y, px, py, radius)
    texture = np.clip(field - threshold + 0.6, 0, 1)
    c.density += amp * np.minimum(envelope, 1) * texture * c.open_lung


def _draw_infiltration(c: _Chest, u) -> None:
    _patchy(c, u, c.fields[1], 0.2, 0.9, 0.18 + 0.17 * u[5], _sev(u, 0.1, 0.2), threshold=0.3 * u[6])


def _draw_pneumonia(c: _Chest, u) -> None:
    field = 0.6 * c.fields[2] + 0.5
    _patchy(c, u, field, 0.45, 0.95, 0.14 + 0.14 * u[5], _sev(u, 0.1, 0.22), threshold=0.2 * u[6])


def _draw_mass(c: _Chest, u) -> None:
    px, py = c.lungs[int(u[1] < 0.5)].point(u[2], u[3], 0.1, 0.85)
    r = 0.08 + 0.08 * u[4]
    lobes = _blob(c.x, c.y, px, py, r) + 0.6 * _blob(c.x, c.y, px + r * (u[5] - 0.5), py + r * (u[6] - 0.5), r * 0.7)
    c.density += _sev(u, 0.18, 0.32) * np.clip(lobes * 1.6, 0, 1)


def _draw_nodule(c: _Chest, u) -> None:
    px, py = c.lungs[int(u[1] < 0.5)].point(u[2], u[3], 0.1, 0.85)
    r = 0.035 + 0.03 * u[4]
    c.density += _sev(u, 0.2, 0.36) * np.clip(_blob(c.x, c.y, px, py, r) * 1.5, 0, 1)


def _draw_pneumothorax(c: _Chest, u) -> None:
    side = int(u[1] < 0.5)
    lung, r, mask = c.lungs[side], c.r[side], c.masks[side]
    edge = 1 - _sev(u, 0.15, 0.45)                                # collapsed lung edge (radius)
    where = _ramp(lung.cy + 0.3 * lung.b - c.y, 0.2) * _ramp((c.x - lung.cx) * lung.lateral + 0.4 * lung.a, 0.2)
    rim = _ramp(r - edge, 0.03) * where * mask                    # air without lung markings
    line = np.exp(-((r - edge) / 0.03) ** 2) * where * mask       # the visceral pleural line
    c.density += -_sev(u, 0.08, 0.14) * rim - _sev(u, 0.07, 0.07) * c.vessels * rim + _sev(u, 0.05, 0.09) * line


def _draw_consolidation(c: _Chest, u) -> None:
    side = int(u[1] < 0.5)
    px, py = c.lungs[side].point(u[2], u[3], 0.2, 0.85)
    r = _radius(c.x, c.y, px, py, 0.1 + 0.12 * u[4], 0.08 + 0.1 * u[5], angle=(u[6] - 0.5) * 2)
    region = _ramp(1 - r, 0.25) * (0.85 + 0.15 * np.clip(c.fields[1], -1, 1))
    c.density += _sev(u, 0.18, 0.3) * region * c.open_masks[side]


def _draw_edema(c: _Chest, u) -> None:
    radius = 0.28 + 0.16 * u[1]
    haze = _blob(c.x, c.y, -0.22, -0.02, radius) + _blob(c.x, c.y, 0.22, 0.0, radius)
    c.density += (_sev(u, 0.07, 0.15) * np.minimum(haze, 1) + _sev(u, 0.05, 0.05) * c.vessels) * c.open_lung


def _draw_emphysema(c: _Chest, u) -> None:
    pass  # all in the geometry (hyperinflation, lucency, fewer markings)


def _draw_fibrosis(c: _Chest, u) -> None:
    period = 0.1 + 0.05 * u[1]
    warp = 0.12 * c.fields[2]
    lines = np.zeros_like(c.x)
    for angle in (u[2] * np.pi, u[2] * np.pi + np.pi / 2.5):
        t = (c.x * np.cos(angle) + c.y * np.sin(angle) + warp) / period
        lines += np.exp(-(np.sin(np.pi * t) / 0.3) ** 2)
    zone = sum(_ramp(r - 0.45, 0.3) for r in c.r) * _ramp(c.y - 0.2 * u[3] + 0.2, 0.4)
    c.density += _sev(u, 0.05, 0.11) * np.minimum(lines, 1) * zone * c.open_lung


def _draw_pleural_thickening(c: _Chest, u) -> None:
    sides = (int(u[1] < 0.5),) if u[2] < 0.7 else (0, 1)
    width = 0.08 + 0.07 * u[3]
    for side in sides:
        lung, r = c.lungs[side], c.r[side]
        lateral = _ramp((c.x - lung.cx) * lung.lateral, 0.2) if u[4] < 0.5 else _ramp(lung.cy - c.y, 0.2)
        rim = _ramp(r - (1 - width), 0.03) * lateral
        c.density += _sev(u, 0.12, 0.24) * rim * c.masks[side]


def _draw_hernia(c: _Chest, u) -> None:
    cx, cy = 0.03 + 0.1 * (u[1] - 0.5), c.lungs[0].base - 0.1 - 0.06 * u[2]
    r = 0.07 + 0.06 * u[0]
    inside = _ramp(1 - _radius(c.x, c.y, cx, cy, r * 1.2, r), 0.15)
    gas = inside * _ramp(cy + 0.2 * r - c.y, 0.02)                 # air above an air-fluid level
    wall = np.exp(-((_radius(c.x, c.y, cx, cy, r * 1.2, r) - 1) / 0.2) ** 2)
    c.density += _sev(u, 0.1, 0.18) * (-gas + 0.4 * wall)


# CheXpert observations without an NIH drawing of their own.

def _shape_enlarged_cardiomediastinum(c: _Chest, u) -> None:
    c.mediastinum_extra += _sev(u, 0.05, 0.12)                  # widened upper mediastinum
    c.heart_scale *= 1 + _sev(u, 0.0, 0.1) * (u[1] < 0.5)        # sometimes with a larger heart too


def _draw_enlarged_cardiomediastinum(c: _Chest, u) -> None:
    c.density += _sev(u, 0.04, 0.08) * c.mediastinum(c.mediastinum_extra) * c.lung


def _draw_lung_opacity(c: _Chest, u) -> None:
    """A hazy, smooth (ground-glass) opacity in one lung or both: softer and wider than
    consolidation, without infiltration's texture."""
    sides = (int(u[1] < 0.5),) if u[2] < 0.6 else (0, 1)
    envelope = np.zeros_like(c.x)
    for side in sides:
        px, py = c.lungs[side].point(u[3], u[4], 0.25, 0.95)
        envelope += _blob(c.x, c.y, px, py, 0.16 + 0.16 * u[5])
    haze = np.minimum(envelope, 1) * (0.8 + 0.2 * np.clip(c.fields[0], -1, 1))
    c.density += _sev(u, 0.08, 0.16) * haze * c.open_lung


def _draw_lung_lesion(c: _Chest, u) -> None:
    (_draw_nodule if u[7] < 0.5 else _draw_mass)(c, u)


def _draw_pleural_other(c: _Chest, u) -> None:
    """Pleural thickening, or calcified pleural plaques: short, bright streaks along the lateral
    chest wall or the diaphragm."""
    if u[7] < 0.5:
        _draw_pleural_thickening(c, u)
        return
    for k in range(2 + int(u[8] * 3)):
        lung = c.lungs[int((u[1] + 0.37 * k) % 1 < 0.5)]
        t = (u[2] + 0.29 * k) % 1
        if u[3] < 0.5:   # lateral wall
            px, py = lung.cx + lung.lateral * lung.a * 0.92, lung.cy - lung.b * (0.5 - t)
            r = _radius(c.x, c.y, px, py, 0.02, 0.07)
        else:            # diaphragm
            px, py = lung.cx + lung.lateral * lung.a * (t - 0.4), lung.base - lung.dome * 0.8
            r = _radius(c.x, c.y, px, py, 0.07, 0.02)
        c.density += _sev(u, 0.12, 0.22) * _ramp(1 - r, 0.5)


def _draw_fracture(c: _Chest, u) -> None:
    """A healing rib fracture on the lateral chest wall: a bright callus across a rib and a thin
    dark fracture gap through it."""
    lung = c.lungs[int(u[1] < 0.5)]
    py = lung.cy - lung.b * (0.6 - 1.0 * u[2])
    px = lung.cx + lung.lateral * lung.a * (0.75 + 0.2 * u[3])
    r = 0.03 + 0.02 * u[4]
    callus = _ramp(1 - _radius(c.x, c.y, px, py, r * 1.4, r), 0.4)
    angle = (u[5] - 0.5) * 1.2
    gap = np.exp(-(((c.x - px) * np.cos(angle) + (c.y - py) * np.sin(angle)) / 0.012) ** 2) * callus
    c.density += _sev(u, 0.12, 0.22) * callus - _sev(u, 0.06, 0.1) * gap


def _tube(c: _Chest, points, width: float) -> np.ndarray:
    """A thin line along a polyline through ``points`` (x, y pairs): a catheter or tube."""
    out = np.zeros_like(c.x)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((c.x - x0) * dx + (c.y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.hypot(c.x - x0 - t * dx, c.y - y0 - t * dy)
        out = np.maximum(out, np.exp(-(dist / width) ** 2))
    return out


def _draw_support_devices(c: _Chest, u) -> None:
    """Radio-opaque lines and devices: an endotracheal tube, a central venous catheter from the
    clavicle region to the superior vena cava, or a pacemaker box with its lead into the heart
    (at least one; several at once as in ICU films)."""
    amp, width = _sev(u, 0.25, 0.4), 0.012 + 0.006 * u[1]
    kinds = [u[2] < 0.5, u[3] < 0.5, u[4] < 0.25]
    if not any(kinds):
        kinds[int(u[5] * 3)] = True
    lines = np.zeros_like(c.x)
    if kinds[0]:   # endotracheal tube: down the trachea, tip above the carina
        tip = -0.45 + 0.15 * u[6]
        lines = np.maximum(lines, _tube(c, [(0.02, -1.1), (0.02 + 0.02 * (u[7] - 0.5), tip)], width * 1.5))
    if kinds[1]:   # central line from either side
        side = -1 if u[8] < 0.5 else 1
        start = (side * (0.55 + 0.15 * u[9]), -0.75)
        lines = np.maximum(lines, _tube(c, [start, (side * 0.12, -0.55), (0.05, -0.3 + 0.1 * u[10])], width))
    if kinds[2]:   # pacemaker: a box below the left clavicle, lead into the right ventricle
        box = (np.abs(c.x - 0.55) < 0.07) & (np.abs(c.y + 0.6) < 0.05)
        lines = np.maximum(lines, box.astype(np.float32))
        lines = np.maximum(lines, _tube(c, [(0.55, -0.6), (0.15, -0.45), (0.05, -0.1), (0.15, 0.2)], width))
    c.density += amp * lines


_SHAPE = {"Atelectasis": _shape_atelectasis, "Cardiomegaly": _shape_cardiomegaly,
          "Emphysema": _shape_emphysema, "Fibrosis": _shape_fibrosis}
_DRAW = {
    "Atelectasis": _draw_atelectasis, "Cardiomegaly": lambda c, u: None, "Effusion": _draw_effusion,
    "Infiltration": _draw_infiltration, "Mass": _draw_mass, "Nodule": _draw_nodule,
    "Pneumonia": _draw_pneumonia, "Pneumothorax": _draw_pneumothorax, "Consolidation": _draw_consolidation,
    "Edema": _draw_edema, "Emphysema": _draw_emphysema, "Fibrosis": _draw_fibrosis,
    "Pleural_Thickening": _draw_pleural_thickening, "Hernia": _draw_hernia,
}
# CheXpert observation -> (shape, draw); the NIH drawing where the two vocabularies share a finding
_CHEXPERT_PARTS = {
    "No Finding": (None, None),
    "Enlarged Cardiomediastinum": (_shape_enlarged_cardiomediastinum, _draw_enlarged_cardiomediastinum),
    "Cardiomegaly": (_shape_cardiomegaly, None),
    "Lung Opacity": (None, _draw_lung_opacity),
    "Lung Lesion": (None, _draw_lung_lesion),
    "Edema": (None, _draw_edema),
    "Consolidation": (None, _draw_consolidation),
    "Pneumonia": (None, _draw_pneumonia),
    "Atelectasis": (_shape_atelectasis, _draw_atelectasis),
    "Pneumothorax": (None, _draw_pneumothorax),
    "Pleural Effusion": (None, _draw_effusion),
    "Pleural Other": (None, _draw_pleural_other),
    "Fracture": (None, _draw_fracture),
    "Support Devices": (None, _draw_support_devices),
}
_PARTS = {"nih14": {name: (_SHAPE.get(name), _DRAW[name]) for name in NIH14.names},
          "chexpert14": _CHEXPERT_PARTS}


def _distractors(c: _Chest, u) -> None:
    """Normal look-alikes of findings (nipple shadows, end-on vessels) so that a bright dot alone
    does not mean Nodule."""
    if u[0] < 0.3:
        for lung in c.lungs:
            px, py = lung.point(0.5 + 0.3 * lung.lateral * u[1], 0.8 + 0.1 * u[2], 0.1, 0.9)
            c.density += (0.05 + 0.08 * u[3]) * _blob(c.x, c.y, px, py, 0.035)
    if u[4] < 0.4:
        px, py = c.lungs[int(u[5] < 0.5)].point(u[6], u[7], 0.3, 0.8)
        c.density += (0.06 + 0.1 * u[8]) * _blob(c.x, c.y, px, py, 0.022)


def render(i: int, labels, seed: int = 0, size: int = 64, patient: int | None = None,
           view: str = "PA", label_set: str = "nih14") -> np.ndarray:
    """Image ``i`` of the synthetic set ``seed`` drawn with the 14 ``labels`` (0/1) of ``label_set``
    (NIH's by default, or ``chexpert14``), float32 size×size in [0, 1]. ``patient`` (default ``i``)
    fixes the shared anatomy."""
    labels = np.asarray(labels, dtype=bool)
    parts = _PARTS[label_set]
    names = LABEL_SETS[label_set][0].names
    anatomy = _rng(seed, _ANATOMY, i if patient is None else int(patient)).random(12, dtype=np.float32)
    rng = _rng(seed, _IMAGE, i)
    jitter, look, extra = (rng.random(k, dtype=np.float32) for k in (4, 4, 9))
    finding_u = rng.random((14, 12), dtype=np.float32)   # 14 rows whatever the labels: same streams
    noise = rng.standard_normal((3, 12, 12), dtype=np.float32) * 0.6
    pixel_noise = rng.standard_normal((size, size), dtype=np.float32)
    chest = _Chest(size, anatomy, jitter, noise, ap=view == "AP")
    present = [(parts[name], finding_u[j]) for j, name in enumerate(names) if labels[j]]
    for (shape, _), u in present:
        if shape is not None:
            shape(chest, u)
    chest.layout()
    chest.draw_anatomy()
    _distractors(chest, extra)
    for (_, draw), u in present:
        if draw is not None:
            draw(chest, u)
    return chest.finish(look, pixel_noise).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------ datasets

class SyntheticReader:
    """``Records.reader`` of a synthetic set: row ``i`` → its rendered image (picklable)."""

    def __init__(self, seed: int, size: int, labels: np.ndarray, patients: np.ndarray, views: np.ndarray,
                 label_set: str = "nih14"):
        self.seed, self.size, self.label_set = seed, size, label_set
        self.labels, self.patients, self.views = labels.astype(bool), patients, views

    def __call__(self, i: int) -> np.ndarray:
        return render(i, self.labels[i], self.seed, self.size, int(self.patients[i]), str(self.views[i]),
                      self.label_set)


def make_records(n: int, seed: int = 0, size: int = 64, temperature: float = 1.0,
                 labels: str = "nih14") -> Records:
    """Records of ``n`` synthetic images (labels and metadata; images rendered on read)."""
    _check(n, seed, size)
    space = label_set(labels)
    label_set_name = labels
    labels = sample_labels(n, seed, temperature, label_set_name)
    patients, follow_up = sample_patients(n, seed)
    views = sample_views(labels, seed, label_set_name)
    patient_id = pd.Series([f"s{seed}p{p:06d}" for p in patients], dtype="str")
    meta = pd.DataFrame({
        "path": pd.Series([f"synthetic://{seed}/{i}" for i in range(n)], dtype="str"),
        "patient_id": patient_id,
        "study_id": patient_id + pd.Series([f"_{f:03d}" for f in follow_up], dtype="str"),
        "view": pd.Series(views, dtype="str"),
        "frontal_lateral": pd.Series(["frontal"] * n, dtype="str"),
    })
    reader = SyntheticReader(seed, size, labels, patients, views, label_set_name)
    return Records("synthetic", space, labels, meta, reader)


def generate(n: int, size: int = 64, seed: int = 0, temperature: float = 1.0,
             labels: str = "nih14") -> tuple[np.ndarray, Records]:
    """``n`` rendered images (float32 N×size×size in [0, 1]) and their Records."""
    records = make_records(n, seed, size, temperature, labels)
    images = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        images[i] = records.read(i)
    return images, records


def load_synthetic(spec: str) -> Records:
    """Records for a ``synthetic:`` source spec (see the module docstring for the grammar)."""
    options = parse_spec(spec)
    return make_records(options.pop("n"), **options)


def parse_spec(spec: str) -> dict:
    """``"3000,seed=1"`` → {"n": 3000, "seed": 1, "size": 64, "temperature": 1.0, "labels": "nih14"}."""
    parts = [p.strip() for p in str(spec).split(",")]
    where = f"synthetic source {spec!r} (expected N[,seed=S][,size=PX][,temperature=T][,labels=nih14|chexpert14])"
    n = _number(parts[0], int, "N", where) if parts[0] else DEFAULT_N
    out = {"n": n, "seed": 0, "size": 64, "temperature": 1.0, "labels": "nih14"}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in SPEC_KEYS:
            hint = closest(key, SPEC_KEYS) if key not in SPEC_KEYS else None
            raise CxrlabError(f"{where}: bad option {part!r}"
                              + (f"; did you mean {hint!r}?" if hint else "")
                              + f" (options: {', '.join(k + '=' for k in SPEC_KEYS)})")
        if key == "labels":
            if value.strip() not in LABEL_SETS:
                raise unknown(f"{where}: label set", value.strip(), tuple(LABEL_SETS))
            out[key] = value.strip()
            continue
        out[key] = _number(value.strip(), float if key == "temperature" else int, key, where)
    _check(out["n"], out["seed"], out["size"])
    if not out["temperature"] > 0:
        raise CxrlabError(f"{where}: temperature must be > 0")
    return out


def _number(text: str, kind, what: str, where: str):
    try:
        return kind(text)
    except ValueError:
        raise CxrlabError(f"{where}: {what} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {text!r}") from None


def _check(n: int, seed: int, size: int) -> None:
    if n < 1:
        raise CxrlabError(f"synthetic: need at least 1 image, got N={n}")
    if seed < 0:
        raise CxrlabError(f"synthetic: seed must be >= 0, got {seed}")
    if size < 16:
        raise CxrlabError(f"synthetic: size must be >= 16 pixels, got {size}")
